//! Finding cgroup v2 directories: the hierarchy's mount point and the
//! cgroup of this process (where the agent's listeners, and so its accepted
//! sockets, belong).

use std::fs;
use std::path::{Path, PathBuf};

use crate::EbpfError;

/// Mount point and mounted root of the first cgroup2 mount in `mountinfo`.
fn cgroup2_mount(mountinfo: &str) -> Option<(PathBuf, String)> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let mut f = left.split_whitespace();
        let root = f.nth(3)?;
        let mount_point = f.next()?;
        Some((PathBuf::from(unescape(mount_point)), unescape(root)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The v2 path (`0::/a/b`) in `/proc/self/cgroup` content.
fn own_v2_path(proc_cgroup: &str) -> Option<&str> {
    proc_cgroup.lines().find_map(|l| l.strip_prefix("0::"))
}

fn join(mount: &Path, mount_root: &str, cgroup: &str) -> PathBuf {
    // Inside a cgroup namespace or a bind mount of a subtree, the mount's
    // root is a prefix of the path the process reports.
    let rel = cgroup
        .strip_prefix(mount_root.trim_end_matches('/'))
        .unwrap_or(cgroup);
    mount.join(rel.trim_start_matches('/'))
}

/// The cgroup v2 directory of the calling process.
pub(crate) fn own_cgroup() -> Result<PathBuf, EbpfError> {
    let read = |p: &str| {
        fs::read_to_string(p).map_err(|source| EbpfError::Cgroup {
            path: p.into(),
            source,
        })
    };
    let (mount, root) =
        cgroup2_mount(&read("/proc/self/mountinfo")?).ok_or(EbpfError::NoCgroup2)?;
    let proc_cgroup = read("/proc/self/cgroup")?;
    let path = own_v2_path(&proc_cgroup).ok_or(EbpfError::NoCgroup2)?;
    Ok(join(&mount, &root, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
24 30 0:22 / /sys rw,nosuid - sysfs sysfs rw
35 24 0:30 / /sys/fs/cgroup ro - tmpfs tmpfs ro,mode=755
36 35 0:31 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
37 35 0:32 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
";

    #[test]
    fn finds_the_cgroup2_mount() {
        let (m, r) = cgroup2_mount(MOUNTINFO).unwrap();
        assert_eq!(m, PathBuf::from("/sys/fs/cgroup/unified"));
        assert_eq!(r, "/");
        assert!(cgroup2_mount("24 30 0:22 / /sys rw - sysfs sysfs rw\n").is_none());
    }

    #[test]
    fn joins_process_path_to_mount() {
        assert_eq!(own_v2_path("1:cpu:/\n0::/a/b\n"), Some("/a/b"));
        let m = Path::new("/sys/fs/cgroup");
        assert_eq!(join(m, "/", "/"), PathBuf::from("/sys/fs/cgroup/"));
        assert_eq!(join(m, "/", "/a/b"), PathBuf::from("/sys/fs/cgroup/a/b"));
        assert_eq!(
            join(m, "/kubepods/x", "/kubepods/x/c"),
            PathBuf::from("/sys/fs/cgroup/c")
        );
    }

    #[test]
    fn unescapes_octal() {
        assert_eq!(unescape(r"/a\040b"), "/a b");
        assert_eq!(unescape(r"/a\04"), r"/a\04");
    }
}
