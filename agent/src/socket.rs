//! How the agent makes its sockets: in which network namespace, with which
//! mark, whether they may borrow another address (transparent), and how
//! they notice a peer that vanished (TCP keepalive).
//!
//! A workload enrolled through capture has its sockets made inside its own
//! network namespace, so its traffic leaves from its own address; a
//! workload served without capture uses the agent's namespace.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream};

use crate::capture::netns::Netns;

/// Where sockets are created.
#[derive(Clone, Debug, Default)]
pub enum Sockets {
    /// The agent's own network namespace.
    #[default]
    Host,
    /// A workload's network namespace.
    Netns(Arc<Netns>),
}

/// Options for an outgoing connection.
#[derive(Clone, Copy, Debug, Default)]
pub struct ConnectOpts {
    /// Local address to bind before connecting.
    pub bind: Option<SocketAddr>,
    /// Allow `bind` to be an address this host does not own (IP_TRANSPARENT),
    /// to connect as the original client.
    pub transparent: bool,
    /// SO_MARK, so capture does not redirect the agent's own traffic.
    pub mark: Option<u32>,
    /// Probe an idle connection so a vanished peer is noticed.
    pub keepalive: Option<Keepalive>,
}

/// TCP keepalive on a connection: after `time` idle, a probe every
/// `interval`; `retries` unanswered probes and the kernel closes it (reads
/// fail with ETIMEDOUT, so the proxy closes the other side). With
/// `user_timeout`, also TCP_USER_TIMEOUT = time + retries x interval: data
/// left unacknowledged that long closes it too, where keepalive alone
/// waits for the retransmissions to give up (~15 minutes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keepalive {
    pub time: Duration,
    pub interval: Duration,
    pub retries: u32,
    pub user_timeout: bool,
}

impl Keepalive {
    /// How long a dead peer can go unnoticed on an idle connection.
    pub fn bound(&self) -> Duration {
        self.time + self.interval * self.retries
    }

    /// Sets the options on `socket` (any TCP socket, connected or not).
    pub fn apply(&self, socket: socket2::SockRef<'_>) -> io::Result<()> {
        let ka = socket2::TcpKeepalive::new()
            .with_time(self.time)
            .with_interval(self.interval)
            .with_retries(self.retries);
        socket.set_tcp_keepalive(&ka)?;
        if self.user_timeout {
            socket.set_tcp_user_timeout(Some(self.bound()))?;
        }
        Ok(())
    }
}

/// Options for a listener.
#[derive(Clone, Copy, Debug, Default)]
pub struct ListenOpts {
    pub transparent: bool,
    pub mark: Option<u32>,
    /// Set once on the listener: Linux copies keepalive (and
    /// TCP_USER_TIMEOUT) to every socket it accepts.
    pub keepalive: Option<Keepalive>,
}

/// `addr` with an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, how a
/// dual-stack socket shows an IPv4 peer) written as the IPv4 address it is,
/// so a workload, policy or record sees one form of each address.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

impl Sockets {
    /// Whether connections to applications can keep the client's address:
    /// only inside a captured workload's namespace, where replies to the
    /// borrowed address are routed back to the agent.
    pub fn preserves_source(&self) -> bool {
        matches!(self, Sockets::Netns(_))
    }

    pub async fn connect(&self, dst: SocketAddr, opts: ConnectOpts) -> io::Result<TcpStream> {
        let socket = self.make(move || tcp_socket(dst, opts)).await?;
        tokio::net::TcpSocket::from_std_stream(socket.into())
            .connect(dst)
            .await
    }

    /// A listener on `addr`. `[::]` is dual stack: it accepts IPv4 too
    /// (peers then show as IPv4-mapped; see [`canonical`]).
    pub async fn listen(&self, addr: SocketAddr, opts: ListenOpts) -> io::Result<TcpListener> {
        let socket = self
            .make(move || {
                let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
                if addr.is_ipv6() && addr.ip().is_unspecified() {
                    // `[::]` takes IPv4 too, whatever the namespace's
                    // net.ipv6.bindv6only says.
                    s.set_only_v6(false)?;
                }
                s.set_reuse_address(true)?;
                // A workload's new listeners open beside its old ones before
                // those close: no moment with nothing listening behind capture.
                s.set_reuse_port(true)?;
                if opts.transparent {
                    set_transparent(&s, addr)?;
                }
                if let Some(m) = opts.mark {
                    s.set_mark(m)?;
                }
                if let Some(ka) = opts.keepalive {
                    ka.apply(socket2::SockRef::from(&s))?;
                }
                s.set_nonblocking(true)?;
                s.bind(&addr.into())?;
                s.listen(1024)?;
                Ok(s)
            })
            .await?;
        TcpListener::from_std(socket.into())
    }

    /// A UDP socket bound to `addr` (port 0: any), marked with `mark`.
    /// `reuse_port` lets a successor bind the same address before this
    /// one closes (listeners only).
    pub async fn udp(
        &self,
        addr: SocketAddr,
        mark: Option<u32>,
        reuse_port: bool,
    ) -> io::Result<tokio::net::UdpSocket> {
        let socket = self
            .make(move || udp_socket(addr, mark, reuse_port))
            .await?;
        tokio::net::UdpSocket::from_std(socket.into())
    }

    /// `n` nonblocking UDP sockets bound to `addr` (port 0: each its own
    /// port), made in one trip to the namespace.
    pub async fn udp_batch(
        &self,
        addr: SocketAddr,
        mark: Option<u32>,
        n: usize,
    ) -> io::Result<Vec<std::net::UdpSocket>> {
        let make = move || -> io::Result<Vec<std::net::UdpSocket>> {
            (0..n)
                .map(|_| udp_socket(addr, mark, false).map(Into::into))
                .collect()
        };
        match self {
            Sockets::Host => make(),
            Sockets::Netns(ns) => ns.run(make).await,
        }
    }

    async fn make<F>(&self, f: F) -> io::Result<Socket>
    where
        F: FnOnce() -> io::Result<Socket> + Send + 'static,
    {
        match self {
            Sockets::Host => f(),
            Sockets::Netns(ns) => ns.run(f).await,
        }
    }
}

fn set_transparent(s: &Socket, addr: SocketAddr) -> io::Result<()> {
    if addr.is_ipv4() {
        s.set_ip_transparent_v4(true)
    } else {
        s.set_ip_transparent_v6(true)
    }
}

/// Lets `connect` pick the local port of a socket bound to an address
/// only (IP_BIND_ADDRESS_NO_PORT). `bind(ip, 0)` would pick one unique
/// for that address alone, searching past every port in use or in
/// TIME_WAIT on it; `connect` needs it unique only for the 4-tuple, so
/// many connections from one pod address to different peers do not
/// exhaust or crawl through the port range.
fn defer_port_choice(s: &Socket) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let on: libc::c_int = 1;
    // SAFETY: a valid socket fd and a c_int option value of the size given.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn udp_socket(addr: SocketAddr, mark: Option<u32>, reuse_port: bool) -> io::Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if reuse_port {
        s.set_reuse_address(true)?;
        s.set_reuse_port(true)?;
    }
    if let Some(m) = mark {
        s.set_mark(m)?;
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    Ok(s)
}

fn tcp_socket(dst: SocketAddr, opts: ConnectOpts) -> io::Result<Socket> {
    let s = Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))?;
    s.set_nonblocking(true)?;
    s.set_tcp_nodelay(true)?;
    if let Some(m) = opts.mark {
        s.set_mark(m)?;
    }
    if let Some(ka) = opts.keepalive {
        ka.apply(socket2::SockRef::from(&s))?;
    }
    if let Some(bind) = opts.bind {
        if bind.is_ipv4() == dst.is_ipv4() {
            if opts.transparent {
                set_transparent(&s, bind)?;
            }
            if bind.port() == 0 {
                defer_port_choice(&s)?;
            }
            s.bind(&bind.into())?;
        }
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_address_only_bind_leaves_the_port_to_connect() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("listen");
        let dst = listener.local_addr().expect("addr");
        let opts = ConnectOpts {
            bind: Some("127.0.0.1:0".parse().expect("bind")),
            ..Default::default()
        };
        let s = tcp_socket(dst, opts).expect("socket");
        let bound = s.local_addr().expect("local").as_socket().expect("inet");
        assert_eq!(bound.port(), 0, "no port taken at bind");
        let stream = tokio::net::TcpSocket::from_std_stream(s.into())
            .connect(dst)
            .await
            .expect("connect");
        let local = stream.local_addr().expect("local");
        assert_eq!(local.ip(), bound.ip());
        assert_ne!(local.port(), 0, "connect chose the port");
    }

    #[tokio::test]
    async fn keepalive_and_user_timeout_are_set_on_connections() {
        let ka = Keepalive {
            time: Duration::from_secs(7),
            interval: Duration::from_secs(3),
            retries: 4,
            user_timeout: true,
        };
        // Set on the listener, inherited by what it accepts.
        let listener = Sockets::Host
            .listen(
                "127.0.0.1:0".parse().expect("addr"),
                ListenOpts {
                    keepalive: Some(ka),
                    ..Default::default()
                },
            )
            .await
            .expect("listen");
        let dst = listener.local_addr().expect("addr");
        let opts = ConnectOpts {
            keepalive: Some(ka),
            ..Default::default()
        };
        let stream = Sockets::Host.connect(dst, opts).await.expect("connect");
        let s = socket2::SockRef::from(&stream);
        assert!(s.keepalive().expect("SO_KEEPALIVE"));
        assert_eq!(s.tcp_keepalive_time().expect("idle"), ka.time);
        assert_eq!(s.tcp_keepalive_interval().expect("interval"), ka.interval);
        assert_eq!(s.tcp_keepalive_retries().expect("count"), ka.retries);
        assert_eq!(
            s.tcp_user_timeout().expect("user timeout"),
            Some(ka.bound())
        );
        assert_eq!(ka.bound(), Duration::from_secs(19));

        let (accepted, _) = listener.accept().await.expect("accept");
        let a = socket2::SockRef::from(&accepted);
        assert!(a.keepalive().expect("SO_KEEPALIVE"), "inherited");
        assert_eq!(a.tcp_keepalive_time().expect("idle"), ka.time);
        assert_eq!(a.tcp_keepalive_interval().expect("interval"), ka.interval);
        assert_eq!(a.tcp_keepalive_retries().expect("count"), ka.retries);
        assert_eq!(
            a.tcp_user_timeout().expect("user timeout"),
            Some(ka.bound())
        );

        // Without user_timeout the kernel's default (none) stays.
        let opts = ConnectOpts {
            keepalive: Some(Keepalive {
                user_timeout: false,
                ..ka
            }),
            ..Default::default()
        };
        let plain = Sockets::Host.connect(dst, opts).await.expect("connect");
        let p = socket2::SockRef::from(&plain);
        assert!(p.keepalive().expect("SO_KEEPALIVE"));
        assert_eq!(p.tcp_user_timeout().expect("user timeout"), None);
    }
}
