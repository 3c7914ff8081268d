//! The applications of meshed test Pods and their plain clients, run by `e2e` subcommands inside
//! a Pod's network namespace (the proxy tests start them with `ip netns exec`).
//!
//! The server says who it is and who called: an HTTP answer carries the Pod's name and the
//! `l5d-client-id` it got (so a test sees the identity the Pod's proxy vouched for), and every
//! request and connection is logged with a timestamp (so a test sees which requests reached which
//! Pod, including those no client answer shows). The clients know nothing of the mesh: they dial
//! the address they are given, as an unmodified application does, and the Pod's iptables rules
//! hand the connection to its proxy.

use std::{
    io::Write,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
};

/// What the app logs once it listens: the harness waits for this line before it calls the Pod
/// ready.
pub const LISTENING: &str = "listening";

/// Milliseconds since the Unix epoch (the harness compares them with its own clock: one machine).
pub fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default()
}

/// One line to a shared log (stdout of the app, a file the harness reads).
type Log = Arc<Mutex<Box<dyn Write + Send>>>;

fn log_line(log: &Log, line: &str) {
    if let Ok(mut w) = log.lock() {
        let _ = writeln!(w, "{line}");
        let _ = w.flush();
    }
}

/// Serves `http` (HTTP/1 and HTTP/2 with prior knowledge, on one port) and, if given, `banner`:
/// a server-speaks-first protocol that sends `hello from <name>` on accept, then echoes every
/// line until the client half-closes. Logs `request <ms> <version> <method> <path>
/// client-id=<id>` and `banner <ms> <peer>` lines to stdout.
pub async fn serve(name: String, http: SocketAddr, banner: Option<SocketAddr>) -> Result<()> {
    let log: Log = Arc::new(Mutex::new(Box::new(std::io::stdout())));
    let http = TcpListener::bind(http)
        .await
        .with_context(|| format!("binding {http}"))?;
    let banner = match banner {
        Some(a) => Some(
            TcpListener::bind(a)
                .await
                .with_context(|| format!("binding {a}"))?,
        ),
        None => None,
    };
    log_line(&log, LISTENING);
    let web = serve_http(name.clone(), http, log.clone());
    let banner = async {
        match banner {
            Some(l) => serve_banner(name.clone(), l, log.clone()).await,
            None => std::future::pending().await,
        }
    };
    tokio::join!(web, banner);
    Ok(())
}

async fn serve_http(name: String, listener: TcpListener, log: Log) {
    loop {
        let Ok((s, _)) = listener.accept().await else {
            continue;
        };
        let _ = s.set_nodelay(true);
        let (name, log) = (name.clone(), log.clone());
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let h = |k: &str| {
                        req.headers()
                            .get(k)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_owned()
                    };
                    let client_id = h("l5d-client-id");
                    let grpc = h("content-type").starts_with("application/grpc");
                    log_line(
                        &log,
                        &format!(
                            "request {} {:?} {} {} client-id={client_id}",
                            now_ms(),
                            req.version(),
                            req.method(),
                            req.uri().path()
                        ),
                    );
                    let body = format!(
                        "name={name}\nclient-id={client_id}\nversion={:?}\nhost={}\n",
                        req.version(),
                        h("host"),
                    );
                    async move {
                        let mut rsp = http::Response::builder();
                        if grpc {
                            // A trailers-only gRPC answer (status in the headers) is enough for a
                            // client to see success; the body still names the Pod for the test.
                            rsp = rsp
                                .header("content-type", "application/grpc")
                                .header("grpc-status", "0");
                        }
                        rsp.body(Full::new(Bytes::from(body)))
                    }
                });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(s), svc)
                .await;
        });
    }
}

async fn serve_banner(name: String, listener: TcpListener, log: Log) {
    loop {
        let Ok((mut s, peer)) = listener.accept().await else {
            continue;
        };
        log_line(&log, &format!("banner {} {peer}", now_ms()));
        let name = name.clone();
        tokio::spawn(async move {
            if s.write_all(format!("hello from {name}\n").as_bytes())
                .await
                .is_err()
            {
                return;
            }
            let (r, mut w) = s.split();
            let mut lines = BufReader::new(r).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if w.write_all(format!("{line}\n").as_bytes()).await.is_err() {
                    return;
                }
            }
            let _ = w.shutdown().await;
        });
    }
}

/// A client of the banner protocol: reads the greeting without sending anything first (a
/// proxy that waited for the client to speak would stall here), sends `message`, half-closes,
/// and returns everything the server sent.
pub async fn banner_client(addr: SocketAddr, message: &str, timeout: Duration) -> Result<String> {
    let exchange = async {
        let mut s = TcpStream::connect(addr).await?;
        let mut greeting = Vec::new();
        // The greeting is one line; read it before speaking.
        let mut byte = [0u8; 1];
        while !greeting.ends_with(b"\n") {
            if s.read(&mut byte).await? == 0 {
                bail!(
                    "the connection closed before a greeting ({:?})",
                    String::from_utf8_lossy(&greeting)
                );
            }
            greeting.push(byte[0]);
        }
        s.write_all(format!("{message}\n").as_bytes()).await?;
        s.shutdown().await?;
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await?;
        greeting.extend(rest);
        Ok(String::from_utf8_lossy(&greeting).into_owned())
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .with_context(|| format!("no complete exchange with {addr} within {timeout:?}"))?
}

/// One HTTP/1.1 GET of `http://<addr><path>` on a fresh connection: status and body.
pub async fn get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<(u16, String)> {
    let exchange = async {
        let tcp = TcpStream::connect(addr).await?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        let rsp = send
            .send_request(
                http::Request::builder()
                    .uri(path)
                    .header("host", addr.to_string())
                    .body(Full::new(Bytes::new()))?,
            )
            .await?;
        let status = rsp.status().as_u16();
        let body = rsp.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .context("timed out")?
}

/// Sends GETs to `addr` from `workers` concurrent loops, each one request after another on a
/// fresh connection, until stdin closes; prints `<start ms> <end ms> <status or ERR> <name=...
/// of the answer, or the error>` per request. The harness reads these lines while the loops run.
pub async fn client_loop(addr: SocketAddr, workers: usize, timeout: Duration) -> Result<()> {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // stdin's end: the harness dropped its end of the pipe.
    let stopping = stop.clone();
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
        stopping.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    let worker = |stop: Arc<std::sync::atomic::AtomicBool>| async move {
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let start = now_ms();
            let line = match get(addr, "/loop", timeout).await {
                Ok((status, body)) => {
                    let name = body
                        .lines()
                        .find_map(|l| l.strip_prefix("name="))
                        .unwrap_or("?")
                        .to_owned();
                    format!("{start} {} {status} {name}", now_ms())
                }
                Err(e) => format!(
                    "{start} {} ERR {}",
                    now_ms(),
                    format!("{e:#}").replace('\n', " ")
                ),
            };
            let failed = line.contains(" ERR ");
            {
                let mut out = std::io::stdout().lock();
                writeln!(out, "{line}")?;
                out.flush()?;
            }
            if failed {
                // A client's back-off: a refused connection fails at once, and a loop of them
                // would only burn the CPU the proxies need.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        anyhow::Ok(())
    };
    let all: Vec<_> = (0..workers.max(1))
        .map(|_| tokio::spawn(worker(stop.clone())))
        .collect();
    for w in all {
        w.await??;
    }
    Ok(())
}

/// One line of [`client_loop`]'s output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoopRequest {
    pub start_ms: u128,
    pub end_ms: u128,
    /// The status, or `None` for a request that got no answer.
    pub status: Option<u16>,
    /// The answering Pod's name, or the error.
    pub detail: String,
}

impl LoopRequest {
    pub fn parse(line: &str) -> Option<Self> {
        let mut f = line.splitn(4, ' ');
        let start_ms = f.next()?.parse().ok()?;
        let end_ms = f.next()?.parse().ok()?;
        let status = f.next()?;
        let detail = f.next().unwrap_or_default().to_owned();
        Some(Self {
            start_ms,
            end_ms,
            status: if status == "ERR" {
                None
            } else {
                Some(status.parse().ok()?)
            },
            detail,
        })
    }

    /// Whether the request was answered with success.
    pub fn ok(&self) -> bool {
        self.status.is_some_and(|s| (200..300).contains(&s))
    }
}

/// One line of the app's log about an HTTP request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppRequest {
    pub at_ms: u128,
    pub version: String,
    pub path: String,
    pub client_id: String,
}

impl AppRequest {
    pub fn parse(line: &str) -> Option<Self> {
        let rest = line.strip_prefix("request ")?;
        let mut f = rest.splitn(5, ' ');
        let at_ms = f.next()?.parse().ok()?;
        let version = f.next()?.to_owned();
        let _method = f.next()?;
        let path = f.next()?.to_owned();
        let client_id = f.next()?.strip_prefix("client-id=")?.to_owned();
        Some(Self {
            at_ms,
            version,
            path,
            client_id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_parse() {
        let r = AppRequest::parse("request 17 HTTP/1.1 GET /loop client-id=a.b").unwrap();
        assert_eq!(r.at_ms, 17);
        assert_eq!(r.version, "HTTP/1.1");
        assert_eq!(r.path, "/loop");
        assert_eq!(r.client_id, "a.b");
        let r = AppRequest::parse("request 17 HTTP/2.0 POST / client-id=").unwrap();
        assert_eq!(r.client_id, "");
        assert!(AppRequest::parse("banner 17 1.2.3.4:5").is_none());

        let l = LoopRequest::parse("10 12 200 echo-0").unwrap();
        assert!(l.ok());
        assert_eq!(l.detail, "echo-0");
        let l = LoopRequest::parse("10 12 ERR connection refused (os error 111)").unwrap();
        assert!(!l.ok());
        assert_eq!(l.status, None);
        assert_eq!(l.detail, "connection refused (os error 111)");
    }
}
