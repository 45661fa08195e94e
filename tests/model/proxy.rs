//! A TCP proxy between the agent and its database, in the test process, to
//! cut the network: refuse (connections refused, open ones closed) or hang
//! (nothing forwarded, sockets kept open: a dead link that never says so).

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    /// Forwarding both ways.
    Up,
    /// Not listening (connects are refused); open connections are closed.
    Refusing,
    /// Connections are accepted and kept, nothing is forwarded until `Up`.
    Hanging,
}

pub struct Proxy {
    pub addr: SocketAddr,
    link: watch::Sender<Link>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = bind("127.0.0.1:0".parse().unwrap()).expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let (link, watch) = watch::channel(Link::Up);
        let task = tokio::spawn(serve(Some(listener), addr, upstream, watch));
        Proxy { addr, link, task }
    }

    pub fn set(&self, link: Link) {
        self.link.send_replace(link);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.link.send_replace(Link::Refusing);
        self.task.abort();
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(128)
}

async fn serve(
    mut listener: Option<TcpListener>,
    addr: SocketAddr,
    upstream: SocketAddr,
    mut link: watch::Receiver<Link>,
) {
    loop {
        if *link.borrow_and_update() == Link::Refusing {
            // Closing the listening socket: connects are refused.
            listener = None;
            if link.changed().await.is_err() {
                return;
            }
            continue;
        }
        let Some(open) = &listener else {
            match bind(addr) {
                Ok(l) => listener = Some(l),
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
            }
            continue;
        };
        tokio::select! {
            accepted = open.accept() => {
                if let Ok((client, _)) = accepted {
                    tokio::spawn(connection(client, upstream, link.clone()));
                }
            }
            changed = link.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
    }
}

/// Waits while the link hangs: `true` once it is up, `false` when it refuses.
async fn wait_up(link: &mut watch::Receiver<Link>) -> bool {
    loop {
        match *link.borrow_and_update() {
            Link::Up => return true,
            Link::Refusing => return false,
            Link::Hanging => {}
        }
        if link.changed().await.is_err() {
            return false;
        }
    }
}

async fn connection(client: TcpStream, upstream: SocketAddr, mut link: watch::Receiver<Link>) {
    if !wait_up(&mut link).await {
        return;
    }
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    // Either direction ending (or the link refusing) closes both sockets.
    tokio::select! {
        () = pump(client_read, server_write, link.clone()) => {}
        () = pump(server_read, client_write, link) => {}
    }
}

async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mut link: watch::Receiver<Link>) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        if !wait_up(&mut link).await {
            return;
        }
        let n = tokio::select! {
            read = from.read(&mut buffer) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            changed = link.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
        };
        // Bytes read just as the link went down wait for it too.
        if !wait_up(&mut link).await {
            return;
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}
