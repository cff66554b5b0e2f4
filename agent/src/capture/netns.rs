//! Entering a network namespace. Sockets belong to the namespace they were
//! created in, so a [`Netns`] keeps one thread parked inside the namespace
//! and runs socket-creating closures there; the sockets are then used from
//! any thread. Tokio's workers never call `setns`.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::sync::Mutex;

type Job = Box<dyn FnOnce() + Send>;

/// Which network namespace an fd refers to: the device and inode of the
/// namespace file, the same for every fd or path that names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NetnsId {
    pub dev: u64,
    pub ino: u64,
}

impl NetnsId {
    /// The namespace `fd` refers to.
    pub fn of(fd: &impl AsFd) -> io::Result<NetnsId> {
        use std::os::unix::fs::MetadataExt;
        let meta = File::from(fd.as_fd().try_clone_to_owned()?).metadata()?;
        Ok(NetnsId {
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }
}

/// A handle on a network namespace with a thread inside it.
pub struct Netns {
    path: PathBuf,
    fd: OwnedFd,
    id: NetnsId,
    jobs: Mutex<mpsc::Sender<Job>>,
}

impl std::fmt::Debug for Netns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Netns").field("path", &self.path).finish()
    }
}

impl Netns {
    /// Opens the namespace at `path` (e.g. `/var/run/netns/pod1` or
    /// `/proc/<pid>/ns/net`) and starts its thread.
    pub fn open(path: &Path) -> io::Result<Netns> {
        let file = File::open(path).map_err(|e| {
            io::Error::new(e.kind(), format!("opening netns {}: {e}", path.display()))
        })?;
        Self::from_fd(path.to_path_buf(), file.into())
    }

    /// Like [`Netns::open`], from a namespace fd received from elsewhere
    /// (the CNI hands them over a unix socket).
    pub fn from_fd(path: PathBuf, fd: OwnedFd) -> io::Result<Netns> {
        let id = NetnsId::of(&fd)?;
        let thread_fd = fd.try_clone()?;
        let (jobs, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("netns".into())
            .spawn(move || {
                // SAFETY: setns on an fd we own; it affects only this thread.
                let rc = unsafe { libc::setns(thread_fd.as_raw_fd(), libc::CLONE_NEWNET) };
                let entered = if rc == 0 {
                    Ok(())
                } else {
                    Err(io::Error::last_os_error())
                };
                let ok = entered.is_ok();
                let _ = ready_tx.send(entered);
                if ok {
                    while let Ok(job) = rx.recv() {
                        job();
                    }
                }
            })?;
        ready_rx
            .recv()
            .map_err(|_| io::Error::other("netns thread died"))?
            .map_err(|e| {
                io::Error::new(e.kind(), format!("entering netns {}: {e}", path.display()))
            })?;
        Ok(Netns {
            path,
            fd,
            id,
            jobs: Mutex::new(jobs),
        })
    }

    /// Which namespace this is (two handles on one namespace compare equal).
    pub fn id(&self) -> NetnsId {
        self.id
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` inside the namespace and waits for its result without
    /// blocking the async runtime.
    pub async fn run<T, F>(&self, f: F) -> io::Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> io::Result<T> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(Box::new(move || {
            let _ = tx.send(f());
        }))?;
        rx.await
            .map_err(|_| io::Error::other("netns thread went away"))?
    }

    /// Whether IPv6 works in the namespace: the kernel has it and the
    /// namespace's loopback has not had it disabled (`disable_ipv6`, as on
    /// an IPv4-only node). istio-cni reads the same file to skip its IPv6
    /// loopback route. An unreadable file for another reason counts as
    /// IPv6 present, so a real failure is reported, not skipped.
    pub fn has_ipv6(&self) -> io::Result<bool> {
        self.run_blocking(|| {
            match std::fs::read_to_string("/proc/sys/net/ipv6/conf/lo/disable_ipv6") {
                Ok(v) => Ok(v.trim() != "1"),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
                Err(_) => Ok(true),
            }
        })
    }

    /// Runs `f` inside the namespace, blocking the caller.
    pub fn run_blocking<T, F>(&self, f: F) -> io::Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> io::Result<T> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel();
        self.submit(Box::new(move || {
            let _ = tx.send(f());
        }))?;
        rx.recv()
            .map_err(|_| io::Error::other("netns thread went away"))?
    }

    fn submit(&self, job: Job) -> io::Result<()> {
        self.jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(job)
            .map_err(|_| io::Error::other("netns thread went away"))
    }

    /// The addresses configured inside the namespace, without loopback
    /// and IPv6 link-local ones: what the pod's peers reach it on.
    pub async fn addresses(&self) -> io::Result<Vec<std::net::IpAddr>> {
        use nix::net::if_::InterfaceFlags;
        self.run(|| {
            let mut out = Vec::new();
            for ifa in nix::ifaddrs::getifaddrs().map_err(io::Error::from)? {
                if ifa.flags.contains(InterfaceFlags::IFF_LOOPBACK) {
                    continue;
                }
                let Some(addr) = ifa.address else { continue };
                if let Some(v4) = addr.as_sockaddr_in() {
                    out.push(std::net::IpAddr::V4(v4.ip()));
                } else if let Some(v6) = addr.as_sockaddr_in6() {
                    let ip = v6.ip();
                    // fe80::/10
                    if ip.segments()[0] & 0xffc0 != 0xfe80 {
                        out.push(std::net::IpAddr::V6(ip));
                    }
                }
            }
            out.sort_unstable();
            out.dedup();
            Ok(out)
        })
        .await
    }

    /// A command that runs inside the namespace (for `nft`, `ip`).
    pub fn command(&self, program: &str) -> Command {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(program);
        let fd = self.fd.as_raw_fd();
        // SAFETY: between fork and exec only setns, which is
        // async-signal-safe, is called; the fd stays open in the child.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    }
}
