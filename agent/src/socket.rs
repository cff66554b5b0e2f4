//! How the agent makes its sockets: in which network namespace, with which
//! mark, and whether they may borrow another address (transparent).
//!
//! A workload enrolled through capture has its sockets made inside its own
//! network namespace, so its traffic leaves from its own address; a
//! workload served without capture uses the agent's namespace.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

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
}

/// Options for a listener.
#[derive(Clone, Copy, Debug, Default)]
pub struct ListenOpts {
    pub transparent: bool,
    pub mark: Option<u32>,
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

    pub async fn listen(&self, addr: SocketAddr, opts: ListenOpts) -> io::Result<TcpListener> {
        let socket = self
            .make(move || {
                let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
                s.set_reuse_address(true)?;
                if opts.transparent {
                    set_transparent(&s, addr)?;
                }
                if let Some(m) = opts.mark {
                    s.set_mark(m)?;
                }
                s.set_nonblocking(true)?;
                s.bind(&addr.into())?;
                s.listen(1024)?;
                Ok(s)
            })
            .await?;
        TcpListener::from_std(socket.into())
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

fn tcp_socket(dst: SocketAddr, opts: ConnectOpts) -> io::Result<Socket> {
    let s = Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))?;
    s.set_nonblocking(true)?;
    s.set_tcp_nodelay(true)?;
    if let Some(m) = opts.mark {
        s.set_mark(m)?;
    }
    if let Some(bind) = opts.bind {
        if bind.is_ipv4() == dst.is_ipv4() {
            if opts.transparent {
                set_transparent(&s, bind)?;
            }
            s.bind(&bind.into())?;
        }
    }
    Ok(s)
}
