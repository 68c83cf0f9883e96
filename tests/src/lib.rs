//! Helpers shared by the integration tests in `tests/tests/`: a real `raftblkd`
//! process per test ([`Daemon`]), the `raftblk` CLI against it, a tiny HTTP GET,
//! external client tools with timeouts ([`run`]), and a minimal raw NBD client
//! ([`RawNbd`]) for requests that well-behaved clients never send.
//!
//! The daemon binaries come from the workspace target directory (the directory
//! the test executable itself lives in, so `CARGO_TARGET_DIR` is honoured). The
//! first test in each test binary runs `cargo build -p raftblk-daemon --bins`
//! so they are never stale; set `RAFTBLK_TESTS_NO_BUILD=1` to skip that (as
//! `scripts/test.sh` may, having built the workspace already).

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How long a client tool may run before the test kills it and fails.
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the daemon may take to answer `/healthz` after start.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// 1 MiB.
pub const MIB: u64 = 1 << 20;

// ---------------------------------------------------------------------------
// Binaries

/// The directory holding the workspace binaries (`target/debug`).
pub fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("RAFTBLK_BIN_DIR") {
        return PathBuf::from(dir);
    }
    // Test executables live in <target>/<profile>/deps/.
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("test executable has a directory");
    if deps.file_name() == Some(OsStr::new("deps")) {
        if let Some(profile_dir) = deps.parent() {
            return profile_dir.to_path_buf();
        }
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| workspace_root().join("target"));
    target.join("debug")
}

/// The workspace root (the directory above this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// Builds the daemon binaries once per test process and returns (raftblkd, raftblk).
pub fn binaries() -> (PathBuf, PathBuf) {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let dir = bin_dir();
    let (daemon, cli) = (dir.join("raftblkd"), dir.join("raftblk"));
    let result = BUILT.get_or_init(|| {
        let skip = std::env::var("RAFTBLK_TESTS_NO_BUILD").is_ok_and(|v| v == "1");
        if skip && daemon.exists() && cli.exists() {
            return Ok(());
        }
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-p", "raftblk-daemon", "--bins", "--manifest-path"])
            .arg(workspace_root().join("Cargo.toml"))
            .status()
            .map_err(|e| format!("cannot run cargo: {e}"))?;
        if !status.success() {
            return Err(format!("`cargo build -p raftblk-daemon --bins` failed: {status}"));
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    assert!(daemon.exists(), "{} does not exist after the build", daemon.display());
    assert!(cli.exists(), "{} does not exist after the build", cli.display());
    (daemon, cli)
}

// ---------------------------------------------------------------------------
// External tools

/// Whether `name` is an executable on PATH.
pub fn have_tool(name: &str) -> bool {
    let Some(path) = std::env::var_os("PATH") else {
        return false;
    };
    std::env::split_paths(&path).any(|dir| {
        let p = dir.join(name);
        p.is_file()
            && std::fs::metadata(&p).is_ok_and(|m| {
                use std::os::unix::fs::PermissionsExt;
                m.permissions().mode() & 0o111 != 0
            })
    })
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Returns true when every tool is present. Otherwise prints a loud skip
/// message and returns false, or panics when `CI=true` (CI installs them all
/// through `scripts/install-test-deps.sh`, so nothing may skip there).
pub fn require_tools(test: &str, tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools.iter().copied().filter(|t| !have_tool(t)).collect();
    if missing.is_empty() {
        return true;
    }
    skip_or_fail(test, &format!("missing tools {missing:?}"))
}

/// Like [`require_tools`], for the python3 libnbd binding.
pub fn require_python_nbd(test: &str) -> bool {
    if python_nbd().is_some() {
        return true;
    }
    skip_or_fail(test, "no python3 with the `nbd` module (Debian package python3-libnbd)")
}

fn skip_or_fail(test: &str, why: &str) -> bool {
    let msg = format!("{test}: {why}; run scripts/install-test-deps.sh");
    if in_ci() {
        panic!("CI=true and {msg}");
    }
    eprintln!("\n!!!!!!!!!! SKIPPED {msg} !!!!!!!!!!\n");
    false
}

/// A python3 interpreter that can `import nbd`. Debian's python3-libnbd lives in
/// /usr/lib/python3/dist-packages, which a pyenv or venv python3 first on PATH
/// does not see (this also breaks `nbdsh`, which runs `python3 -mnbd`), so
/// /usr/bin/python3 is tried first.
pub fn python_nbd() -> Option<PathBuf> {
    static FOUND: OnceLock<Option<PathBuf>> = OnceLock::new();
    FOUND
        .get_or_init(|| {
            ["/usr/bin/python3", "python3"].into_iter().map(PathBuf::from).find(|p| {
                Command::new(p)
                    .args(["-c", "import nbd"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            })
        })
        .clone()
}

/// What a finished command left behind.
#[derive(Debug)]
pub struct Out {
    /// The command line, for messages.
    pub cmdline: String,
    /// Exit status.
    pub status: ExitStatus,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Out {
    /// Whether the command exited 0.
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// Exit code (-1 when killed by a signal).
    pub fn code(&self) -> i32 {
        self.status.code().unwrap_or(-1)
    }

    /// Panics with everything the command printed unless it exited 0; returns stdout.
    #[track_caller]
    pub fn ok(&self) -> &str {
        assert!(self.success(), "command failed: {self}");
        &self.stdout
    }

    /// Panics unless the command exited non-zero; returns stderr.
    #[track_caller]
    pub fn failed(&self) -> &str {
        assert!(!self.success(), "command unexpectedly succeeded: {self}");
        &self.stderr
    }

    /// Parses stdout as JSON (panics with the output when it is not).
    #[track_caller]
    pub fn json(&self) -> serde_json::Value {
        let text = self.ok();
        serde_json::from_str(text).unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self}"))
    }
}

impl std::fmt::Display for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "`{}` -> {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.cmdline, self.status, self.stdout, self.stderr
        )
    }
}

/// Runs `cmd` with stdin closed, capturing output; kills it after `timeout`.
pub fn run_cmd(mut cmd: Command, timeout: Duration) -> Out {
    let cmdline = format!("{cmd:?}");
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot run {cmdline}: {e}"));
    let mut so = child.stdout.take().expect("stdout piped");
    let mut se = child.stderr.take().expect("stderr piped");
    let t_out = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = so.read_to_end(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = se.read_to_end(&mut s);
        s
    });
    let started = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break st;
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let st = child.wait().expect("wait");
            let stdout = String::from_utf8_lossy(&t_out.join().unwrap_or_default()).into_owned();
            let stderr = String::from_utf8_lossy(&t_err.join().unwrap_or_default()).into_owned();
            panic!("{cmdline} timed out after {timeout:?} ({st})\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = String::from_utf8_lossy(&t_out.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&t_err.join().unwrap_or_default()).into_owned();
    Out { cmdline, status, stdout, stderr }
}

/// Runs `program args...` with [`TOOL_TIMEOUT`].
pub fn run<S: AsRef<OsStr>>(program: &str, args: &[S]) -> Out {
    let mut cmd = Command::new(program);
    cmd.args(args);
    run_cmd(cmd, TOOL_TIMEOUT)
}

/// Runs `qemu-io -f raw` on `uri` with one `-c` per command.
pub fn qemu_io(uri: &str, commands: &[&str]) -> Out {
    let mut args: Vec<String> = vec!["-f".into(), "raw".into()];
    for c in commands {
        args.push("-c".into());
        args.push((*c).into());
    }
    args.push(uri.into());
    run("qemu-io", &args)
}

/// Runs a python script (with the libnbd binding importable) with arguments.
pub fn python(script: &str, args: &[&str]) -> Out {
    let py = python_nbd().expect("python3 with the nbd module (check require_python_nbd first)");
    let mut cmd = Command::new(py);
    cmd.arg("-c").arg(script).args(args);
    let mut out = run_cmd(cmd, TOOL_TIMEOUT);
    // the whole script is in the test source; keep failure messages readable
    out.cmdline = format!("python3 -c <script> {}", args.join(" "));
    out
}

/// A deterministic pseudo-random buffer (xorshift64*), so failures reproduce.
pub fn pseudo_random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

// ---------------------------------------------------------------------------
// HTTP

/// A free loopback TCP port (bound and released; [`Daemon::start`] retries on a race).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0").local_addr().expect("local_addr").port()
}

/// `GET path` over plain HTTP/1.1; returns (status code, body).
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAccept: */*\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{m}: {text:?}"));
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| bad("no header end"))?;
    let code: u16 =
        head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or_else(|| bad("no status code"))?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked { dechunk(body).ok_or_else(|| bad("bad chunked body"))? } else { body.to_string() };
    Ok((code, body))
}

fn dechunk(mut s: &str) -> Option<String> {
    let mut out = String::new();
    loop {
        let (size_line, rest) = s.split_once("\r\n")?;
        let size = usize::from_str_radix(size_line.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            return Some(out);
        }
        out.push_str(rest.get(..size)?);
        s = rest.get(size + 2..)?;
    }
}

// ---------------------------------------------------------------------------
// The daemon

/// A running `raftblkd` with its own data directory and loopback ports; killed on drop.
pub struct Daemon {
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// NBD TCP address.
    pub nbd_addr: SocketAddr,
    /// HTTP API address.
    pub api_addr: SocketAddr,
    /// NBD unix socket path.
    pub socket: PathBuf,
    daemon_bin: PathBuf,
    cli_bin: PathBuf,
}

impl Daemon {
    /// Starts a daemon on a fresh temporary data directory and free ports.
    pub fn start() -> Daemon {
        let (daemon_bin, cli_bin) = binaries();
        let mut dir = tempfile::Builder::new().prefix("raftblk-test.").tempdir().expect("tempdir");
        let socket = dir.path().join("nbd.sock");
        let mut last_log = String::new();
        for _attempt in 0..5 {
            let mut d = Daemon {
                nbd_addr: SocketAddr::from(([127, 0, 0, 1], free_port())),
                api_addr: SocketAddr::from(([127, 0, 0, 1], free_port())),
                socket: socket.clone(),
                child: None,
                dir,
                daemon_bin: daemon_bin.clone(),
                cli_bin: cli_bin.clone(),
            };
            match d.spawn_and_wait() {
                Ok(()) => return d,
                Err(log) => {
                    // Another test may have taken a port between free_port() and bind.
                    last_log = log;
                    if !last_log.contains("cannot listen") {
                        break;
                    }
                    dir = d.take_dir();
                }
            }
        }
        panic!("raftblkd did not start:\n{last_log}");
    }

    fn take_dir(mut self) -> tempfile::TempDir {
        self.stop_child();
        let placeholder = tempfile::tempdir().expect("tempdir");
        std::mem::replace(&mut self.dir, placeholder)
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The temporary directory the test may also use for scratch files.
    pub fn scratch(&self) -> &Path {
        self.dir.path()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("raftblkd.log")
    }

    /// Everything the daemon (all its incarnations) wrote to stderr.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// `nbd://127.0.0.1:PORT/NAME`.
    pub fn nbd_uri(&self, name: &str) -> String {
        format!("nbd://{}/{name}", self.nbd_addr)
    }

    /// `nbd+unix:///NAME?socket=PATH`.
    pub fn unix_uri(&self, name: &str) -> String {
        format!("nbd+unix:///{name}?socket={}", self.socket.display())
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon is running").id()
    }

    fn spawn_and_wait(&mut self) -> Result<(), String> {
        let log_start = self.log().len();
        let new_log = |d: &Daemon| d.log().get(log_start..).unwrap_or_default().to_string();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(|e| format!("cannot open log: {e}"))?;
        let mut cmd = Command::new(&self.daemon_bin);
        for (k, _) in std::env::vars() {
            if k.starts_with("RAFTBLK_") {
                cmd.env_remove(k);
            }
        }
        cmd.arg("--data-dir")
            .arg(self.data_dir())
            .arg("--nbd-listen")
            .arg(self.nbd_addr.to_string())
            .arg("--api-listen")
            .arg(self.api_addr.to_string())
            .arg("--nbd-socket")
            .arg(&self.socket)
            .args(["--bootstrap-volumes", "none"])
            .env("RUST_LOG", std::env::var("RAFTBLK_TEST_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log);
        let child = cmd.spawn().map_err(|e| format!("cannot spawn {}: {e}", self.daemon_bin.display()))?;
        self.child = Some(child);
        let started = Instant::now();
        loop {
            if let Ok((200, body)) = http_get(self.api_addr, "/healthz") {
                if body.trim() == "ok" {
                    return Ok(());
                }
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(format!("raftblkd exited during start ({status}); log:\n{}", new_log(self)));
                }
            }
            if started.elapsed() > START_TIMEOUT {
                self.stop_child();
                return Err(format!(
                    "raftblkd did not answer /healthz within {START_TIMEOUT:?}; log:\n{}",
                    new_log(self)
                ));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    fn stop_child(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGKILL, and reap.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("daemon is running");
        child.kill().expect("SIGKILL raftblkd");
        let status = child.wait().expect("wait for raftblkd");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9),
            "raftblkd did not die of SIGKILL: {status}"
        );
    }

    /// SIGTERM; waits up to `timeout` for the exit and returns the status
    /// (SIGKILLs and panics on timeout).
    pub fn sigterm(&mut self, timeout: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("daemon is running");
        let pid = child.id().to_string();
        let st = Command::new("kill").args(["-TERM", &pid]).status().expect("run kill");
        assert!(st.success(), "kill -TERM {pid} failed");
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status;
            }
            if started.elapsed() > timeout {
                let _ = child.kill();
                let _ = child.wait();
                panic!("raftblkd did not exit within {timeout:?} of SIGTERM; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the daemon again on the same data directory and ports
    /// (after [`kill9`](Self::kill9) or [`sigterm`](Self::sigterm)).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "restart() needs the daemon stopped first");
        let mut last = String::new();
        for _ in 0..20 {
            match self.spawn_and_wait() {
                Ok(()) => return,
                Err(e) if e.contains("cannot listen") => {
                    last = e;
                    std::thread::sleep(Duration::from_millis(250));
                }
                Err(e) => panic!("{e}"),
            }
        }
        panic!("restart kept failing to bind: {last}");
    }

    /// Whether the process is still alive.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Runs `raftblk --api http://ADDR args...`.
    pub fn cli(&self, args: &[&str]) -> Out {
        let mut cmd = Command::new(&self.cli_bin);
        cmd.env_remove("RAFTBLK_API").arg("--api").arg(format!("http://{}", self.api_addr)).args(args);
        run_cmd(cmd, Duration::from_secs(60))
    }

    /// Runs the CLI with `--json`, asserts success and parses the output.
    #[track_caller]
    pub fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        self.cli(&a).json()
    }

    /// Creates a read-write volume through the CLI.
    #[track_caller]
    pub fn create_volume(&self, name: &str, size: &str) {
        self.cli(&["volume", "create", name, "--size", size]).ok();
    }

    /// `GET path` on the API.
    #[track_caller]
    pub fn get(&self, path: &str) -> (u16, String) {
        http_get(self.api_addr, path).unwrap_or_else(|e| panic!("GET {path}: {e}\nlog:\n{}", self.log()))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop_child();
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!(
                "---- raftblkd log (last {} lines) ----\n{}",
                tail.len(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }
}

// ---------------------------------------------------------------------------
// A raw NBD client

/// NBD wire constants used by [`RawNbd`].
pub mod wire {
    /// `NBD_CMD_READ`.
    pub const CMD_READ: u16 = 0;
    /// `NBD_CMD_WRITE`.
    pub const CMD_WRITE: u16 = 1;
    /// `NBD_CMD_DISC`.
    pub const CMD_DISC: u16 = 2;
    /// `NBD_CMD_FLUSH`.
    pub const CMD_FLUSH: u16 = 3;
    /// `NBD_EPERM`.
    pub const EPERM: u32 = 1;
    /// `NBD_EIO`.
    pub const EIO: u32 = 5;
    /// `NBD_EINVAL`.
    pub const EINVAL: u32 = 22;
    /// `NBD_ENOSPC`.
    pub const ENOSPC: u32 = 28;
    /// `NBD_EOVERFLOW`.
    pub const EOVERFLOW: u32 = 75;
    /// `NBD_ENOTSUP`.
    pub const ENOTSUP: u32 = 95;
    /// `NBD_ESHUTDOWN`.
    pub const ESHUTDOWN: u32 = 108;
}

/// A minimal fixed-newstyle NBD client with simple replies only: enough to
/// hold a connection open, and to send requests libnbd will not.
pub struct RawNbd {
    s: TcpStream,
    /// Export size from `NBD_OPT_GO`.
    pub size: u64,
    /// Transmission flags from `NBD_OPT_GO`.
    pub flags: u16,
    cookie: u64,
}

/// A reply to one request.
#[derive(Debug, PartialEq, Eq)]
pub struct RawReply {
    /// NBD error value (0 = success).
    pub error: u32,
    /// Read payload (empty unless a successful read).
    pub data: Vec<u8>,
}

impl RawNbd {
    /// Connects and selects `export` with `NBD_OPT_GO`.
    pub fn connect(addr: SocketAddr, export: &str) -> std::io::Result<RawNbd> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        s.set_nodelay(true)?;
        let mut greet = [0u8; 18];
        s.read_exact(&mut greet)?;
        if &greet[..8] != b"NBDMAGIC" || &greet[8..16] != b"IHAVEOPT" {
            return Err(invalid(format!("bad greeting {greet:02x?}")));
        }
        let hflags = u16::from_be_bytes([greet[16], greet[17]]);
        let cflags: u32 = 1 | if hflags & 2 != 0 { 2 } else { 0 };
        s.write_all(&cflags.to_be_bytes())?;
        // NBD_OPT_GO: name length, name, zero info requests.
        let mut data = Vec::new();
        data.extend_from_slice(&(export.len() as u32).to_be_bytes());
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        let mut opt = Vec::new();
        opt.extend_from_slice(b"IHAVEOPT");
        opt.extend_from_slice(&7u32.to_be_bytes());
        opt.extend_from_slice(&(data.len() as u32).to_be_bytes());
        opt.extend_from_slice(&data);
        s.write_all(&opt)?;
        let (mut size, mut flags) = (None, 0u16);
        loop {
            let mut h = [0u8; 20];
            s.read_exact(&mut h)?;
            if u64::from_be_bytes(h[..8].try_into().expect("8 bytes")) != 0x0003_e889_0455_65a9 {
                return Err(invalid(format!("bad option reply magic {h:02x?}")));
            }
            let rtype = u32::from_be_bytes(h[12..16].try_into().expect("4 bytes"));
            let len = u32::from_be_bytes(h[16..20].try_into().expect("4 bytes")) as usize;
            let mut payload = vec![0u8; len];
            s.read_exact(&mut payload)?;
            match rtype {
                1 => break, // ACK
                3 if payload.len() >= 12 && payload[..2] == [0, 0] => {
                    size = Some(u64::from_be_bytes(payload[2..10].try_into().expect("8 bytes")));
                    flags = u16::from_be_bytes([payload[10], payload[11]]);
                }
                3 => {}
                t if t & 0x8000_0000 != 0 => {
                    return Err(invalid(format!(
                        "NBD_OPT_GO {export:?} refused: type {t:#x}: {}",
                        String::from_utf8_lossy(&payload)
                    )))
                }
                t => return Err(invalid(format!("unexpected option reply type {t:#x}"))),
            }
        }
        let size = size.ok_or_else(|| invalid("NBD_OPT_GO acked without NBD_INFO_EXPORT".into()))?;
        Ok(RawNbd { s, size, flags, cookie: 0 })
    }

    /// Sends one request header (and `payload`, for writes) without reading the reply.
    pub fn send(
        &mut self,
        cmd: u16,
        cmd_flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> std::io::Result<u64> {
        self.cookie += 1;
        let mut h = Vec::with_capacity(28 + payload.len());
        h.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        h.extend_from_slice(&cmd_flags.to_be_bytes());
        h.extend_from_slice(&cmd.to_be_bytes());
        h.extend_from_slice(&self.cookie.to_be_bytes());
        h.extend_from_slice(&offset.to_be_bytes());
        h.extend_from_slice(&len.to_be_bytes());
        h.extend_from_slice(payload);
        self.s.write_all(&h)?;
        Ok(self.cookie)
    }

    /// Sends a request and reads its simple reply; `read_len` is how many
    /// payload bytes a successful reply carries.
    pub fn request(
        &mut self,
        cmd: u16,
        cmd_flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> std::io::Result<RawReply> {
        let cookie = self.send(cmd, cmd_flags, offset, len, payload)?;
        let (got, error) = self.recv_simple_reply_header()?;
        if got != cookie {
            return Err(invalid(format!("reply cookie {got} for request {cookie}")));
        }
        let mut data = Vec::new();
        if error == 0 && cmd == wire::CMD_READ {
            data = vec![0u8; len as usize];
            self.s.read_exact(&mut data)?;
        }
        Ok(RawReply { error, data })
    }

    /// Reads one simple reply header; returns (cookie, error). A successful
    /// read's payload follows it on the stream.
    pub fn recv_simple_reply_header(&mut self) -> std::io::Result<(u64, u32)> {
        let mut r = [0u8; 16];
        self.s.read_exact(&mut r)?;
        if u32::from_be_bytes(r[..4].try_into().expect("4 bytes")) != 0x6744_6698 {
            return Err(invalid(format!("bad simple reply magic {r:02x?}")));
        }
        let error = u32::from_be_bytes(r[4..8].try_into().expect("4 bytes"));
        Ok((u64::from_be_bytes(r[8..16].try_into().expect("8 bytes")), error))
    }

    /// Reads `len` bytes at `offset`.
    pub fn read(&mut self, offset: u64, len: u32) -> std::io::Result<RawReply> {
        self.request(wire::CMD_READ, 0, offset, len, &[])
    }

    /// Writes `data` at `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> std::io::Result<RawReply> {
        self.request(wire::CMD_WRITE, 0, offset, data.len() as u32, data)
    }

    /// Sets a read timeout for later replies.
    pub fn set_read_timeout(&self, t: Duration) {
        let _ = self.s.set_read_timeout(Some(t));
    }

    /// Whether the server has closed the connection (reads EOF or errors within `wait`).
    pub fn closed_by_server(&mut self, wait: Duration) -> bool {
        let _ = self.s.set_read_timeout(Some(wait));
        let mut b = [0u8; 1];
        match self.s.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
        }
    }

    /// Sends `NBD_CMD_DISC` and closes.
    pub fn disconnect(mut self) {
        let _ = self.send(wire::CMD_DISC, 0, 0, 0, &[]);
        let _ = self.s.shutdown(Shutdown::Both);
    }
}

fn invalid(m: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, m)
}
