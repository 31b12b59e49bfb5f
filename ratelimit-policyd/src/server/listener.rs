//! Listening sockets: TCP (clients checked against `[server] allow`) and Unix
//! (`[server] socket_mode` and `socket_group` on the socket file; peers checked
//! against `allow_uids`).

use std::io;
use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpSocket, UnixListener};

use crate::config::{ListenAddr, ServerConfig};

/// A bound listening socket.
#[derive(Debug)]
pub enum Listener {
    /// TCP: clients are checked against `[server] allow`.
    Tcp(TcpListener),
    /// A Unix socket: `[server] socket_mode` (0660 by default) and `socket_group`
    /// (give it Postfix's group); peers are checked against `allow_uids`.
    Unix(UnixListener, std::path::PathBuf),
}

impl Listener {
    /// Binds `addr` with the socket settings of `server`. A stale Unix socket file at
    /// the path is replaced.
    pub async fn bind(addr: &ListenAddr, server: &ServerConfig) -> io::Result<Listener> {
        match addr {
            ListenAddr::Tcp(a) => {
                let socket = if a.is_ipv4() {
                    TcpSocket::new_v4()?
                } else {
                    TcpSocket::new_v6()?
                };
                socket.set_reuseaddr(true)?;
                socket.bind(*a)?;
                Ok(Listener::Tcp(socket.listen(LISTEN_BACKLOG)?))
            }
            ListenAddr::Unix(path) => {
                use std::os::unix::fs::{FileTypeExt, PermissionsExt};
                if let Ok(meta) = std::fs::symlink_metadata(path)
                    && meta.file_type().is_socket()
                {
                    std::fs::remove_file(path)?;
                }
                let l = UnixListener::bind(path)?;
                if let Some(g) = &server.socket_group {
                    std::os::unix::fs::chown(path, None, Some(g.gid)).map_err(|e| {
                        io::Error::new(
                            e.kind(),
                            format!("cannot give the socket group {} ({}): {e}", g.name, g.gid),
                        )
                    })?;
                }
                std::fs::set_permissions(
                    path,
                    std::fs::Permissions::from_mode(server.socket_mode),
                )?;
                Ok(Listener::Unix(l, path.clone()))
            }
        }
    }

    /// The address bound (TCP).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match self {
            Listener::Tcp(l) => l.local_addr().ok(),
            Listener::Unix(..) => None,
        }
    }

    /// A description for logs.
    pub fn describe(&self) -> String {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map_or_else(|_| "tcp".into(), |a| a.to_string()),
            Listener::Unix(_, p) => format!("unix:{}", p.display()),
        }
    }
}

/// Pending TCP connections the kernel queues before it drops new ones (capped by
/// `net.core.somaxconn`). `TcpListener::bind` would use 128: a Postfix restart starts
/// hundreds of smtpd processes that connect at once, and at `max_connections` new
/// clients wait here, so a short queue turns a burst into SYN retries of 1 s, 3 s, ...
const LISTEN_BACKLOG: u32 = 1024;

/// A connection accepted on a [`Listener`].
pub(super) enum Accepted {
    /// A TCP client and its address.
    Tcp(tokio::net::TcpStream, SocketAddr),
    /// A Unix-socket client.
    Unix(tokio::net::UnixStream),
}

/// Waits for the next connection.
pub(super) async fn accept(l: &Listener) -> io::Result<Accepted> {
    match l {
        Listener::Tcp(l) => l.accept().await.map(|(s, a)| Accepted::Tcp(s, a)),
        Listener::Unix(l, _) => l.accept().await.map(|(s, _)| Accepted::Unix(s)),
    }
}
