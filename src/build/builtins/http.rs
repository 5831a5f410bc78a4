//! Downloads for the builtin builders: HTTP and HTTPS only, with `ureq` (blocking, like the rest
//! of a build; rustls over the aws-lc crypto that russh already brings), redirects, timeouts,
//! retries of transient failures and progress lines in the build log.

use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ureq::tls::{Certificate, PemItem, RootCerts, TlsConfig, TlsProvider};

/// How long a connection may take to open, and a read to wait for data (Nix's
/// `connect-timeout` is unset and its stalled-download timeout 300 s; curl gives up connecting
/// after 300 s).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
const STALL_TIMEOUT: Duration = Duration::from_secs(300);
/// Tries of one URL when it fails in a way another try may not (connection, 5xx, timeouts).
const TRIES: u32 = 3;
/// A progress line at most this often.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// Why one URL gave nothing.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The server answered, and not with the file: no use asking it again.
    #[error("{0}")]
    Refused(String),
    /// The network or server failed; another try might do better.
    #[error("{0}")]
    Transient(String),
    /// Writing what came failed: no other URL would do better.
    #[error("{0}")]
    Local(io::Error),
}

/// The proxies a build's environment names (`impureEnvVars` of a fixed-output derivation bring
/// them from the agent's environment), with curl's meaning: `http_proxy` for http URLs,
/// `https_proxy` (or `HTTPS_PROXY`) for https, `all_proxy` for both, except for the hosts in
/// `no_proxy` (names, or domains they end in; `*` for all).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Proxies {
    http: Option<String>,
    https: Option<String>,
    no_proxy: Vec<String>,
}

impl Proxies {
    pub fn from_env(env: &std::collections::BTreeMap<String, String>) -> Proxies {
        let get = |names: &[&str]| names.iter().find_map(|n| env.get(*n).filter(|v| !v.is_empty()).cloned());
        let all = get(&["all_proxy", "ALL_PROXY"]);
        let no_proxy = get(&["no_proxy", "NO_PROXY"]).unwrap_or_default();
        Proxies {
            http: get(&["http_proxy"]).or_else(|| all.clone()),
            https: get(&["https_proxy", "HTTPS_PROXY"]).or(all),
            no_proxy: no_proxy
                .split(',')
                .map(|h| h.trim().trim_start_matches('.').to_ascii_lowercase())
                .filter(|h| !h.is_empty())
                .collect(),
        }
    }

    /// The proxy to reach `url` through, if any.
    pub fn for_url(&self, url: &str) -> Option<&str> {
        let (scheme, rest) = url.split_once("://")?;
        let proxy = if scheme.eq_ignore_ascii_case("https") { self.https.as_deref()? } else { self.http.as_deref()? };
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        let host = match host_port.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or(""),
            None => host_port.split(':').next().unwrap_or(""),
        }
        .to_ascii_lowercase();
        let bypass = self.no_proxy.iter().any(|e| e == "*" || host == *e || host.ends_with(&format!(".{e}")));
        (!bypass).then_some(proxy)
    }
}

/// An HTTP client for a build's downloads.
pub struct Client {
    /// One agent per proxy in use (`None`: direct).
    agents: Vec<(Option<String>, ureq::Agent)>,
    proxies: Proxies,
    /// Whether certificates are checked (they are when a CA bundle was found).
    pub verifying: bool,
}

impl Client {
    /// A client checking certificates against the PEM bundle `ca` (as the host has it); without
    /// one, certificates are not checked: every download is checked against its derivation's
    /// hash, as in Guix, which never checks them for fixed-output downloads.
    pub fn new(ca: Option<&[u8]>, proxies: Proxies) -> Result<Client, String> {
        let (tls, verifying) = tls_config(ca, false);
        let mut agents = Vec::new();
        for proxy in [None, proxies.http.clone(), proxies.https.clone()] {
            if agents.iter().any(|(p, _)| *p == proxy) {
                continue;
            }
            let via = match &proxy {
                Some(p) => Some(ureq::Proxy::new(p).map_err(|e| format!("proxy {p:?}: {e}"))?),
                None => None,
            };
            let config = ureq::Agent::config_builder()
                .tls_config(tls.clone())
                .proxy(via)
                .http_status_as_error(false)
                .max_redirects(10)
                .timeout_connect(Some(CONNECT_TIMEOUT))
                .timeout_per_read(Some(STALL_TIMEOUT))
                .timeout_recv_response(Some(STALL_TIMEOUT))
                .user_agent(concat!("gbc/", env!("CARGO_PKG_VERSION")))
                .build();
            agents.push((proxy, config.into()));
        }
        Ok(Client { agents, proxies, verifying })
    }

    fn agent(&self, url: &str) -> &ureq::Agent {
        let proxy = self.proxies.for_url(url);
        let found = self.agents.iter().find(|(p, _)| p.as_deref() == proxy);
        // Every proxy `for_url` can give has an agent; the direct one is first.
        &found.unwrap_or(&self.agents[0]).1
    }

    /// Download `url` into the file `dest` (created, or emptied at each try), retrying transient
    /// failures; progress goes to `log`. Returns the size.
    pub fn fetch(&self, url: &str, dest: &Path, log: &mut dyn Write) -> Result<u64, FetchError> {
        check_scheme(url).map_err(FetchError::Refused)?;
        let mut last = None;
        for attempt in 1..=TRIES {
            if attempt > 1 {
                let pause = Duration::from_secs(1 << (attempt - 2));
                let _ = writeln!(log, "trying '{url}' again in {}s", pause.as_secs());
                std::thread::sleep(pause);
            }
            match self.try_fetch(url, dest, log) {
                Ok(n) => return Ok(n),
                Err(FetchError::Transient(why)) => {
                    let _ = writeln!(log, "{why}");
                    last = Some(why);
                }
                Err(e) => return Err(e),
            }
        }
        Err(FetchError::Transient(last.unwrap_or_default()))
    }

    fn try_fetch(&self, url: &str, dest: &Path, log: &mut dyn Write) -> Result<u64, FetchError> {
        match self.proxies.for_url(url) {
            Some(proxy) => writeln!(log, "downloading '{url}' through {proxy}..."),
            None => writeln!(log, "downloading '{url}'..."),
        }
        .ok();
        let response = self.agent(url).get(url).call().map_err(|e| classify(url, e))?;
        let status = response.status();
        if !status.is_success() {
            let why = format!("'{url}': HTTP {status}");
            return Err(if status.is_server_error() || status.as_u16() == 429 || status.as_u16() == 408 {
                FetchError::Transient(why)
            } else {
                FetchError::Refused(why)
            });
        }
        let total = response.headers().get("content-length").and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        let mut body = response.into_body().into_reader();
        let mut out =
            std::fs::File::create(dest).map(|f| io::BufWriter::with_capacity(1 << 20, f)).map_err(FetchError::Local)?;
        let start = Instant::now();
        let mut last_report = start;
        let mut got = 0u64;
        let mut buf = vec![0; 256 * 1024];
        loop {
            let n = match body.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(FetchError::Transient(format!("'{url}': {e} after {got} bytes"))),
            };
            out.write_all(&buf[..n]).map_err(FetchError::Local)?;
            got += n as u64;
            if last_report.elapsed() >= PROGRESS_EVERY {
                last_report = Instant::now();
                let _ = writeln!(log, "{}", progress(got, total, start.elapsed()));
            }
        }
        out.flush().map_err(FetchError::Local)?;
        let _ = writeln!(log, "{} from '{url}'", progress(got, total, start.elapsed()));
        Ok(got)
    }
}

/// TLS over rustls with aws-lc, trusting the certificates of the PEM bundle `ca`; and whether
/// certificates are checked: always when `ca` holds some; without any, only when `strict` (then
/// every HTTPS connection fails; else none is checked).
pub(crate) fn tls_config(ca: Option<&[u8]>, strict: bool) -> (TlsConfig, bool) {
    let certs: Vec<Certificate<'static>> = ca
        .map(|pem| {
            ureq::tls::parse_pem(pem)
                .filter_map(|item| match item {
                    Ok(PemItem::Certificate(c)) => Some(c.to_owned()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let verifying = strict || !certs.is_empty();
    let tls = TlsConfig::builder()
        .provider(TlsProvider::Rustls)
        .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .root_certs(RootCerts::Specific(Arc::new(certs)))
        .disable_verification(!verifying)
        .build();
    (tls, verifying)
}

/// Only HTTP and HTTPS: anything else (`file://` above all) could read the build host's files.
pub fn check_scheme(url: &str) -> Result<(), String> {
    let scheme = url.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
    match scheme.as_deref() {
        Some("http" | "https") => Ok(()),
        Some(other) => {
            Err(format!("'{url}': URLs of scheme {other}: are refused (only http and https are downloaded)"))
        }
        None => Err(format!("'{url}' is not a URL")),
    }
}

fn classify(url: &str, e: ureq::Error) -> FetchError {
    match e {
        ureq::Error::BadUri(why) => FetchError::Refused(format!("'{url}': bad URL: {why}")),
        ureq::Error::TooManyRedirects => FetchError::Refused(format!("'{url}': too many redirects")),
        ureq::Error::RedirectFailed => FetchError::Refused(format!("'{url}': a redirect failed")),
        // A certificate that is not trusted will not be on the next try either.
        ureq::Error::Io(e) if e.get_ref().is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some()) => {
            FetchError::Refused(format!("'{url}': {e}"))
        }
        other => FetchError::Transient(format!("'{url}': {other}")),
    }
}

fn progress(got: u64, total: Option<u64>, elapsed: Duration) -> String {
    let mib = |n: u64| n as f64 / (1024.0 * 1024.0);
    let rate = got as f64 / elapsed.as_secs_f64().max(1e-3) / 1e6;
    match total {
        Some(t) => {
            format!("{:.1} MiB of {:.1} MiB in {:.1}s ({rate:.1} MB/s)", mib(got), mib(t), elapsed.as_secs_f64())
        }
        None => format!("{:.1} MiB in {:.1}s ({rate:.1} MB/s)", mib(got), elapsed.as_secs_f64()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxies_as_curl_reads_them() {
        let env = |pairs: &[(&str, &str)]| {
            Proxies::from_env(&pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
        };
        let p = env(&[
            ("http_proxy", "http://p:3128"),
            ("all_proxy", "http://all:1"),
            ("no_proxy", "local, .corp.example"),
        ]);
        assert_eq!(p.for_url("http://example.org/a"), Some("http://p:3128"));
        assert_eq!(p.for_url("https://example.org/a"), Some("http://all:1"));
        assert_eq!(p.for_url("http://local:8080/a"), None);
        assert_eq!(p.for_url("https://user@x.corp.example/a"), None);
        assert_eq!(p.for_url("https://corp.example/a"), None);
        assert_eq!(p.for_url("https://notcorp.example/a"), Some("http://all:1"));
        assert_eq!(env(&[("HTTP_PROXY", "http://ignored:1")]).for_url("http://a/b"), None, "curl ignores HTTP_PROXY");
        assert_eq!(env(&[("https_proxy", "http://s:1"), ("no_proxy", "*")]).for_url("https://a/b"), None);
        assert_eq!(env(&[]).for_url("https://a/b"), None);
    }

    #[test]
    fn only_http_and_https() {
        assert!(check_scheme("http://example.org/a").is_ok());
        assert!(check_scheme("HTTPS://example.org/a").is_ok());
        for bad in ["file:///etc/shadow", "ftp://example.org/a", "/etc/passwd", "mirror://gnu/a"] {
            assert!(check_scheme(bad).is_err(), "{bad}");
        }
    }
}
