//! Samples of a process from /proc (CPU seconds, write syscalls, RSS), of the kernel's TCP
//! memory, and of a Prometheus endpoint.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde::Serialize;

/// One look at a process.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ProcSample {
    /// User + system CPU seconds since the process started.
    pub cpu_s: f64,
    /// Write-like syscalls (write, writev, sendmsg, ...) since start; None if unreadable.
    pub syscw: Option<u64>,
    pub rss_kib: u64,
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// `pid` is a number or "self".
pub fn sample(pid: &str) -> Option<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, cpu_s) = parse_stat(&stat)?;
    let syscw = std::fs::read_to_string(format!("/proc/{pid}/io"))
        .ok()
        .and_then(|io| field(&io, "syscw:"));
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib = field(&status, "VmRSS:").unwrap_or(0);
    Some(ProcSample {
        cpu_s,
        syscw,
        rss_kib,
    })
}

/// The command name and user + system CPU seconds of a /proc/.../stat line.
fn parse_stat(stat: &str) -> Option<(String, f64)> {
    // The command name is in parentheses and may hold spaces: fields count from its end.
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?.to_string();
    let fields: Vec<&str> = stat.get(close + 2..)?.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((comm, (utime + stime) as f64 / clock_ticks()))
}

/// One live thread of a process.
#[derive(Debug, Clone)]
pub struct ThreadCpu {
    pub tid: u32,
    pub comm: String,
    pub cpu_s: f64,
}

/// CPU seconds of each live thread of `pid`. Threads that have exited are missing: their
/// time is only in the process's total.
pub fn threads(pid: u32) -> Vec<ThreadCpu> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let tid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok()?;
        let (comm, cpu_s) = parse_stat(&stat)?;
        Some(ThreadCpu { tid, comm, cpu_s })
    })
    .collect()
}

/// A `Name:  N kB` line of /proc/PID/status.
pub fn status_kib(pid: u32, name: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    field(&s, name)
}

fn field(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Busy CPU seconds of the whole machine (all cores) since boot: everything but idle and iowait.
pub fn machine_busy_s() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    let line = s.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest is included in user)
    let busy: u64 = v
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, x)| x)
        .sum();
    Some(busy as f64 / clock_ticks())
}

/// Pages of memory all TCP sockets of the machine hold (`TCP: ... mem N` in sockstat).
pub fn tcp_mem_pages() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/net/sockstat").ok()?;
    let line = s.lines().find(|l| l.starts_with("TCP:"))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let i = words.iter().position(|w| *w == "mem")?;
    words.get(i + 1)?.parse().ok()
}

/// The kernel's TCP counters of interest for connection storms (`TcpExt` in /proc/net/netstat):
/// accept queue overflows, SYNs dropped, SYN cookies sent.
pub fn listen_counters() -> Option<std::collections::BTreeMap<String, u64>> {
    const WANTED: [&str; 5] = [
        "ListenOverflows",
        "ListenDrops",
        "SyncookiesSent",
        "TCPReqQFullDoCookies",
        "TCPReqQFullDrop",
    ];
    let s = std::fs::read_to_string("/proc/net/netstat").ok()?;
    let mut lines = s.lines().filter(|l| l.starts_with("TcpExt:"));
    let names: Vec<&str> = lines.next()?.split_whitespace().collect();
    let values: Vec<&str> = lines.next()?.split_whitespace().collect();
    Some(
        names
            .iter()
            .zip(values)
            .filter(|(n, _)| WANTED.contains(n))
            .filter_map(|(n, v)| Some((n.to_string(), v.parse().ok()?)))
            .collect(),
    )
}

/// The kernel's estimate of memory available to new work (`MemAvailable` in /proc/meminfo):
/// its drop over a run counts process memory and kernel memory (socket buffers, socket
/// structures) alike.
pub fn mem_available_kib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    field(&s, "MemAvailable:")
}

pub fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as u64
    } else {
        4096
    }
}

/// Raises the soft limit of open files to the hard limit; returns the new soft limit.
pub fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a stack value.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                lim = want;
            }
        }
    }
    lim.rlim_cur
}

/// Fetches a Prometheus text page over plain HTTP/1.1 (loopback only): every series as is,
/// and per metric name the sum of its series.
pub fn scrape(url: &str) -> Option<HashMap<String, f64>> {
    let rest = url.strip_prefix("http://")?;
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/metrics"),
    };
    let body = get(host.parse().ok()?, path)?;
    let mut out = HashMap::new();
    for line in body.lines() {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (series, value) = match line.rsplit_once(' ') {
            Some(x) => x,
            None => continue,
        };
        let name = series.split('{').next().unwrap_or(series).trim();
        if let Ok(v) = value.trim().parse::<f64>() {
            *out.entry(name.to_string()).or_insert(0.0) += v;
            if name != series.trim() {
                out.insert(series.trim().to_string(), v);
            }
        }
    }
    Some(out)
}

/// The body of `GET path` on a loopback address, if it answers 200 within 5 s.
pub fn get(addr: SocketAddr, path: &str) -> Option<String> {
    if !addr.ip().is_loopback() {
        return None;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut body = Vec::new();
    let mut buf = [0u8; 16384];
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => body.extend_from_slice(&buf[..n]),
            Err(_) => break,
        }
    }
    let text = String::from_utf8_lossy(&body);
    let (head, body) = text.split_once("\r\n\r\n")?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return None;
    }
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        Some(body.to_string())
    }
}

/// Upper bounds (seconds) of the buckets holding quantiles `qs` of the observations a
/// Prometheus histogram `name` gained between two scrapes.
pub fn histogram_quantiles(
    a: &HashMap<String, f64>,
    b: &HashMap<String, f64>,
    name: &str,
    qs: &[f64],
) -> Option<Vec<Option<f64>>> {
    let prefix = format!("{name}_bucket{{le=\"");
    let mut buckets: Vec<(f64, f64)> = b
        .iter()
        .filter_map(|(k, v)| {
            let le = k.strip_prefix(&prefix)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, v - a.get(k).copied().unwrap_or(0.0)))
        })
        .collect();
    buckets.sort_by(|x, y| x.0.total_cmp(&y.0));
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    Some(
        qs.iter()
            .map(|q| {
                buckets
                    .iter()
                    .find(|(_, cum)| *cum >= q * total)
                    .map(|(le, _)| *le)
                    .filter(|le| le.is_finite())
            })
            .collect(),
    )
}

fn dechunk(mut body: &str) -> Option<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n")?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            return Some(out);
        }
        out.push_str(rest.get(..size)?);
        body = rest.get(size..)?.strip_prefix("\r\n")?;
    }
}

/// The syscalls that put bytes on a socket. /proc/PID/io `syscw` counts only write/writev
/// (vfs writes); Rust's sockets send with send/sendto, which it does not count.
const SEND_CALLS: [&str; 4] = ["write", "writev", "sendto", "sendmsg"];

/// Counts `pid`'s send-like syscalls for `secs` seconds with `perf stat` (tracepoints), if
/// perf is installed and allowed. Counting mode: the traced process is not slowed measurably.
pub fn perf_start(pid: u32, secs: f64) -> Option<std::process::Child> {
    let events: Vec<String> = SEND_CALLS
        .iter()
        .map(|c| format!("syscalls:sys_enter_{c}"))
        .collect();
    std::process::Command::new("perf")
        .args([
            "stat",
            "-x",
            ",",
            "-e",
            &events.join(","),
            "-p",
            &pid.to_string(),
        ])
        .args(["--", "sleep", &format!("{secs:.3}")])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .ok()
}

/// Waits for `perf stat` and returns the count per syscall.
pub fn perf_finish(child: std::process::Child) -> Option<std::collections::BTreeMap<String, u64>> {
    let out = child.wait_with_output().ok()?;
    let text = String::from_utf8_lossy(&out.stderr);
    let mut counts = std::collections::BTreeMap::new();
    for line in text.lines() {
        let cols: Vec<&str> = line.split(',').collect();
        let Some(event) = cols
            .get(2)
            .and_then(|e| e.strip_prefix("syscalls:sys_enter_"))
        else {
            continue;
        };
        if let Ok(n) = cols[0].trim().parse::<u64>() {
            counts.insert(event.to_string(), n);
        }
    }
    (!counts.is_empty()).then_some(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_itself() {
        let s = sample("self").expect("own /proc entry");
        assert!(s.rss_kib > 0);
        assert!(s.cpu_s >= 0.0);
    }

    #[test]
    fn parses_stat_lines() {
        let line = "42 (rdk:broker 1) S 1 42 42 0 -1 4194560 10 0 0 0 150 50 0 0 20 0 9 0";
        let (comm, cpu) = parse_stat(line).unwrap();
        assert_eq!(comm, "rdk:broker 1");
        assert!((cpu - 200.0 / clock_ticks()).abs() < 1e-9);
        let own = threads(std::process::id());
        assert!(own.iter().any(|t| t.tid == std::process::id()));
    }

    #[test]
    fn reads_mem_available() {
        assert!(mem_available_kib().is_some_and(|k| k > 0));
    }

    #[test]
    fn reads_listen_counters() {
        if let Some(c) = listen_counters() {
            assert!(c.contains_key("ListenOverflows"));
        }
    }

    #[test]
    fn dechunks() {
        assert_eq!(
            dechunk("3\r\nab\n\r\n2\r\ncd\r\n0\r\n\r\n").unwrap(),
            "ab\ncd"
        );
    }
}
