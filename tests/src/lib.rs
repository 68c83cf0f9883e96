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
    /// The KEK given as `RAFTBLK_KEK` at the next start (`None`: no KEK).
    kek: Option<String>,
    /// More `raftblkd` arguments at every start.
    extra_args: Vec<String>,
}

/// The KEK every test daemon gets (through `RAFTBLK_KEK`) unless a test changes it.
pub const TEST_KEK_HEX: &str = "5a0f1e2d3c4b5a69788796a5b4c3d2e1f0112233445566778899aabbccddeeff";

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
                kek: Some(TEST_KEK_HEX.to_string()),
                extra_args: Vec::new(),
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

    /// The KEK (hex) the daemon gets at its next start; `None`: none.
    pub fn set_kek(&mut self, kek: Option<&str>) {
        self.kek = kek.map(str::to_string);
    }

    /// Extra `raftblkd` arguments from the next start on.
    pub fn set_extra_args(&mut self, args: &[&str]) {
        self.extra_args = args.iter().map(|a| a.to_string()).collect();
    }

    /// `<data_dir>/volumes/<uuid>.img`: the volume's data file.
    pub fn image_path(&self, uuid: &str) -> PathBuf {
        self.data_dir().join("volumes").join(format!("{uuid}.img"))
    }

    /// Tries to start the daemon (stopped) and returns its log if it exits or fails.
    pub fn try_restart(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "try_restart() needs the daemon stopped first");
        self.spawn_and_wait()
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
        let mut cmd = daemon_command(
            &self.daemon_bin,
            &self.log_path(),
            &self.data_dir(),
            self.nbd_addr,
            self.api_addr,
            &self.socket,
            self.kek.as_deref(),
        )?;
        cmd.args(["--bootstrap-volumes", "none"]).args(&self.extra_args);
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
        let child = self.child.take().expect("daemon is running");
        sigterm_and_wait(child, timeout).unwrap_or_else(|| {
            panic!("raftblkd did not exit within {timeout:?} of SIGTERM; log:\n{}", self.log())
        })
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

    /// `POST path` with a JSON `body` on the API.
    #[track_caller]
    pub fn post_json(&self, path: &str, body: &str) -> (u16, String) {
        http_post_json(self.api_addr, path, body)
            .unwrap_or_else(|e| panic!("POST {path}: {e}\nlog:\n{}", self.log()))
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
pub mod pattern;

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

// ---------------------------------------------------------------------------
// A cluster of daemons

/// `POST path` with a JSON body over plain HTTP/1.1; returns (status code, body).
pub fn http_post_json(addr: SocketAddr, path: &str, body: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{m}: {text:?}"));
    let (head, rest) = text.split_once("\r\n\r\n").ok_or_else(|| bad("no header end"))?;
    let code: u16 =
        head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or_else(|| bad("no status code"))?;
    Ok((code, rest.to_string()))
}

/// Polls `probe` every 50 ms until it returns `Some`, or panics after `limit`
/// with `what` and the last error `probe` returned.
#[track_caller]
pub fn poll<T>(what: &str, limit: Duration, mut probe: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        match probe() {
            Ok(v) => return v,
            Err(last) => {
                if Instant::now() >= deadline {
                    panic!("timed out after {limit:?} waiting for {what}; last state: {last}");
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The replication state of one volume on one node (`replication` in `volume inspect`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Repl {
    /// The leader this node knows of (0: none).
    pub leader: u64,
    /// Raft term.
    pub term: u64,
    /// Commit index.
    pub commit_index: u64,
    /// Applied index of this node's copy.
    pub applied_index: u64,
    /// Bytes allocated in this node's copy.
    pub allocated_bytes: u64,
    /// First index still in this node's log (older entries compacted).
    pub log_first_index: u64,
    /// Copies being rebuilt from a snapshot (as `inspect` gathers them from every member).
    pub rebuilds: Vec<serde_json::Value>,
}

/// Serializes cluster tests inside one test binary: three daemons per test on a
/// two-core machine already compete for CPU, and failover timings measured while
/// other clusters run next to them would say little.
static CLUSTER_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// One node of a [`Cluster`].
pub struct ClusterNode {
    /// Node id (1-based).
    pub id: u64,
    /// NBD TCP address.
    pub nbd_addr: SocketAddr,
    /// HTTP API address.
    pub api_addr: SocketAddr,
    /// Node-to-node address.
    pub peer_addr: SocketAddr,
    dir: PathBuf,
    child: Option<Child>,
    /// The ids given to `--peers`; `None`: every other node of the cluster.
    static_peers: Option<Vec<u64>>,
    /// A member's API address for `--join` at the next start (cleared by it).
    join: Option<SocketAddr>,
    /// The KEK (hex) given at the next start; `None`: none.
    kek: Option<String>,
}

impl ClusterNode {
    /// The node's data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// `<data_dir>/wal`.
    pub fn wal_dir(&self) -> PathBuf {
        self.data_dir().join("wal")
    }

    /// `<data_dir>/volumes/<uuid>.img`: this node's copy of a volume.
    pub fn image_path(&self, uuid: &str) -> PathBuf {
        self.data_dir().join("volumes").join(format!("{uuid}.img"))
    }

    /// `<data_dir>/volumes/<uuid>.applied`: the checkpointed applied index.
    pub fn applied_path(&self, uuid: &str) -> PathBuf {
        self.data_dir().join("volumes").join(format!("{uuid}.applied"))
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("raftblkd.log")
    }

    /// Everything the node (all its incarnations) wrote.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// `nbd://127.0.0.1:PORT/NAME`.
    pub fn nbd_uri(&self, name: &str) -> String {
        format!("nbd://{}/{name}", self.nbd_addr)
    }

    /// Whether the process is running.
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

/// N `raftblkd` processes forming one cluster on loopback, each with its own
/// temporary data directory and free ports, a 50 ms Raft tick and fault
/// injection on. Every child is killed on drop; when the test is panicking the
/// tail of every node's log is printed.
pub struct Cluster {
    dir: tempfile::TempDir,
    nodes: Vec<ClusterNode>,
    extra_args: Vec<String>,
    daemon_bin: PathBuf,
    cli_bin: PathBuf,
    _serial: std::sync::MutexGuard<'static, ()>,
}

impl Cluster {
    /// Starts `n` nodes and waits until each answers `/healthz`.
    pub fn start(n: usize) -> Cluster {
        Self::start_with(n, &[])
    }

    /// Like [`start`](Self::start), with extra `raftblkd` arguments for every node
    /// (e.g. `["--io-timeout-ms", "3000"]`).
    pub fn start_with(n: usize, extra_args: &[&str]) -> Cluster {
        let serial = CLUSTER_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        let (daemon_bin, cli_bin) = binaries();
        let dir = tempfile::Builder::new().prefix("raftblk-cluster.").tempdir().expect("tempdir");
        let mut c = Cluster {
            dir,
            nodes: Vec::new(),
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            daemon_bin,
            cli_bin,
            _serial: serial,
        };
        let mut last = String::new();
        for _attempt in 0..5 {
            c.kill_all();
            // Hold every listener until all ports are picked, so no two are the same.
            let listeners: Vec<TcpListener> =
                (0..3 * n).map(|_| TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0")).collect();
            let mut addrs = listeners.iter().map(|l| l.local_addr().expect("local_addr"));
            c.nodes = (1..=n as u64)
                .map(|id| {
                    let dir = c.dir.path().join(format!("node{id}"));
                    let _ = std::fs::remove_dir_all(&dir);
                    std::fs::create_dir_all(&dir).expect("create node dir");
                    let mut addr = || addrs.next().expect("3 addresses per node");
                    ClusterNode {
                        id,
                        nbd_addr: addr(),
                        api_addr: addr(),
                        peer_addr: addr(),
                        dir,
                        child: None,
                        static_peers: None,
                        join: None,
                        kek: Some(TEST_KEK_HEX.to_string()),
                    }
                })
                .collect();
            drop(listeners);
            let ids: Vec<u64> = c.ids();
            let spawned: Result<(), String> = ids.iter().try_for_each(|&id| c.spawn(id));
            match spawned.and_then(|()| ids.iter().try_for_each(|&id| c.wait_healthy(id))) {
                Ok(()) => return c,
                Err(e) => {
                    // Another process may have taken a port between free_port() and bind.
                    let retry =
                        e.contains("cannot listen") || e.contains("in use") || e.contains("another process");
                    last = e;
                    if !retry {
                        break;
                    }
                }
            }
        }
        panic!("the cluster did not start:\n{last}");
    }

    /// Node ids, in order.
    pub fn ids(&self) -> Vec<u64> {
        self.nodes.iter().map(|n| n.id).collect()
    }

    /// The KEK (hex) node `id` gets at its next start; `None`: none.
    pub fn set_kek(&mut self, id: u64, kek: Option<&str>) {
        self.node_mut(id).kek = kek.map(str::to_string);
    }

    /// Node `id`.
    pub fn node(&self, id: u64) -> &ClusterNode {
        self.nodes.iter().find(|n| n.id == id).unwrap_or_else(|| panic!("no node {id}"))
    }

    fn node_mut(&mut self, id: u64) -> &mut ClusterNode {
        self.nodes.iter_mut().find(|n| n.id == id).unwrap_or_else(|| panic!("no node {id}"))
    }

    /// `nbd://127.0.0.1:PORT/NAME` of node `id`.
    pub fn nbd_uri(&self, id: u64, name: &str) -> String {
        self.node(id).nbd_uri(name)
    }

    /// Where the cluster's scratch files may go.
    pub fn scratch(&self) -> &Path {
        self.dir.path()
    }

    /// Starts one more node, `--join`ing through node `via`'s API with no `--peers`, and
    /// waits until it answers; returns its id. The nodes started before keep their
    /// `--peers` list without it across restarts, so what they know of it afterwards
    /// they learned from the join.
    pub fn add_joining_node(&mut self, via: u64) -> u64 {
        let id = self.nodes.iter().map(|n| n.id).max().unwrap_or(0) + 1;
        let others: Vec<u64> = self.ids();
        for n in &mut self.nodes {
            if n.static_peers.is_none() {
                n.static_peers = Some(others.iter().copied().filter(|&o| o != n.id).collect());
            }
        }
        let via_api = self.node(via).api_addr;
        let dir = self.dir.path().join(format!("node{id}"));
        let mut last = String::new();
        for _attempt in 0..5 {
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("create node dir");
            let listeners: Vec<TcpListener> =
                (0..3).map(|_| TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0")).collect();
            let addr = |i: usize| listeners[i].local_addr().expect("local_addr");
            let node = ClusterNode {
                id,
                nbd_addr: addr(0),
                api_addr: addr(1),
                peer_addr: addr(2),
                dir: dir.clone(),
                child: None,
                static_peers: Some(Vec::new()),
                join: Some(via_api),
                kek: Some(TEST_KEK_HEX.to_string()),
            };
            drop(listeners);
            self.nodes.retain(|n| n.id != id);
            self.nodes.push(node);
            match self.spawn(id).and_then(|()| self.wait_healthy(id)) {
                Ok(()) => return id,
                Err(e)
                    if e.contains("cannot listen")
                        || e.contains("in use")
                        || e.contains("another process") =>
                {
                    last = e
                }
                Err(e) => panic!("node {id} did not join through node {via}: {e}"),
            }
        }
        panic!("node {id} kept failing to bind: {last}");
    }

    /// The peers node `id` reports in `GET /v1/node`, as "ID@HOST:PORT".
    pub fn try_peers(&self, id: u64) -> Result<Vec<String>, String> {
        match http_get(self.node(id).api_addr, "/v1/node") {
            Ok((200, body)) => {
                let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
                let peers = v["peers"].as_array().ok_or_else(|| format!("no peers in {body}"))?;
                Ok(peers.iter().filter_map(|p| p.as_str().map(str::to_string)).collect())
            }
            Ok((code, body)) => Err(format!("node {id}: HTTP {code}: {body}")),
            Err(e) => Err(format!("node {id}: {e}")),
        }
    }

    /// Every node's "ID@PEER_ADDR" except `id`'s, sorted by id: what `id` should list.
    pub fn expected_peers(&self, id: u64) -> Vec<String> {
        let mut nodes: Vec<&ClusterNode> = self.nodes.iter().filter(|n| n.id != id).collect();
        nodes.sort_by_key(|n| n.id);
        nodes.iter().map(|n| format!("{}@{}", n.id, n.peer_addr)).collect()
    }

    fn spawn(&mut self, id: u64) -> Result<(), String> {
        let static_peers = self.node(id).static_peers.clone();
        let peers: Vec<String> = self
            .nodes
            .iter()
            .filter(|n| n.id != id && static_peers.as_ref().is_none_or(|s| s.contains(&n.id)))
            .map(|n| format!("{}@{}", n.id, n.peer_addr))
            .collect();
        let (daemon_bin, extra) = (self.daemon_bin.clone(), self.extra_args.clone());
        let node = self.node_mut(id);
        assert!(node.child.is_none(), "node {id} is already running");
        let join = node.join.take();
        let mut cmd = daemon_command(
            &daemon_bin,
            &node.log_path(),
            &node.data_dir(),
            node.nbd_addr,
            node.api_addr,
            &node.dir.join("nbd.sock"),
            node.kek.as_deref(),
        )?;
        cmd.arg("--node-id")
            .arg(id.to_string())
            .arg("--peer-listen")
            .arg(node.peer_addr.to_string())
            .arg(format!("--peers={}", peers.join(",")))
            .args(join.map(|a| format!("--join={a}")))
            .args(["--tick-ms", "50", "--fault-injection", "true", "--bootstrap-volumes", "none"])
            // The fault tests pin the leader where they put it; a test of the leader moving
            // to its client's node turns this back on.
            .args(if extra.iter().any(|a| a == "--leader-follows-client") {
                &[][..]
            } else {
                &["--leader-follows-client", "false"][..]
            })
            .args(&extra);
        let child = cmd.spawn().map_err(|e| format!("cannot spawn {}: {e}", daemon_bin.display()))?;
        node.child = Some(child);
        Ok(())
    }

    fn wait_healthy(&mut self, id: u64) -> Result<(), String> {
        let node = self.node_mut(id);
        let log_start = node.log().len();
        let started = Instant::now();
        loop {
            // /v1/node rather than /healthz: it must be this node answering on this port
            if let Ok((200, body)) = http_get(node.api_addr, "/v1/node") {
                let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                if v["node_id"].as_u64() == Some(id) {
                    return Ok(());
                }
                return Err(format!("node {id}: another process answers on {}: {body}", node.api_addr));
            }
            if let Some(Ok(Some(status))) = node.child.as_mut().map(|c| c.try_wait()) {
                node.child = None;
                let log = node.log();
                return Err(format!(
                    "node {id} exited during start ({status}); log:\n{}",
                    log.get(log_start.min(log.len())..).unwrap_or_default()
                ));
            }
            if started.elapsed() > START_TIMEOUT {
                return Err(format!("node {id} did not answer /healthz within {START_TIMEOUT:?}"));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    fn kill_all(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    /// SIGKILL node `id`, and reap it.
    pub fn kill9(&mut self, id: u64) {
        let mut child = self.node_mut(id).child.take().unwrap_or_else(|| panic!("node {id} is not running"));
        child.kill().expect("SIGKILL raftblkd");
        let status = child.wait().expect("wait for raftblkd");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9),
            "node {id} did not die of SIGKILL: {status}"
        );
    }

    /// SIGTERM node `id`; waits up to `timeout` for the exit and returns the status.
    pub fn sigterm(&mut self, id: u64, timeout: Duration) -> ExitStatus {
        let child = self.node_mut(id).child.take().unwrap_or_else(|| panic!("node {id} is not running"));
        sigterm_and_wait(child, timeout)
            .unwrap_or_else(|| panic!("node {id} did not exit within {timeout:?} of SIGTERM"))
    }

    /// Starts node `id` again on its data directory and ports, and waits for `/healthz`.
    pub fn restart(&mut self, id: u64) {
        let mut last = String::new();
        for _ in 0..20 {
            match self.spawn(id).and_then(|()| self.wait_healthy(id)) {
                Ok(()) => return,
                Err(e) if e.contains("cannot listen") || e.contains("in use") => {
                    last = e;
                    std::thread::sleep(Duration::from_millis(250));
                }
                Err(e) => panic!("restarting node {id}: {e}"),
            }
        }
        panic!("restarting node {id} kept failing to bind: {last}");
    }

    /// Whether node `id`'s process is running.
    pub fn is_running(&mut self, id: u64) -> bool {
        self.node_mut(id).is_running()
    }

    /// Runs `raftblk --api http://ADDR args...` against node `id`.
    pub fn cli(&self, id: u64, args: &[&str]) -> Out {
        let mut cmd = Command::new(&self.cli_bin);
        cmd.env_remove("RAFTBLK_API")
            .arg("--api")
            .arg(format!("http://{}", self.node(id).api_addr))
            .args(args);
        run_cmd(cmd, Duration::from_secs(60))
    }

    /// The CLI with `--json` against node `id`; asserts success and parses the output.
    #[track_caller]
    pub fn cli_json(&self, id: u64, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        self.cli(id, &a).json()
    }

    /// Creates a volume through node `on` with `replicas` extra copies; returns its uuid.
    #[track_caller]
    pub fn create_volume(&self, on: u64, name: &str, size: &str, replicas: u8) -> String {
        let v = self
            .cli_json(on, &["volume", "create", name, "--size", size, "--replicas", &replicas.to_string()]);
        v["uuid"].as_str().unwrap_or_else(|| panic!("no uuid in {v}")).to_string()
    }

    /// `GET /v1/volumes/NAME` on node `id` (an error when the node does not answer 200).
    pub fn try_status(&self, id: u64, name: &str) -> Result<serde_json::Value, String> {
        match http_get(self.node(id).api_addr, &format!("/v1/volumes/{name}")) {
            Ok((200, body)) => serde_json::from_str(&body).map_err(|e| format!("{e}: {body}")),
            Ok((code, body)) => Err(format!("node {id}: HTTP {code}: {body}")),
            Err(e) => Err(format!("node {id}: {e}")),
        }
    }

    /// The replication state of `name` on node `id`.
    pub fn try_repl(&self, id: u64, name: &str) -> Result<Repl, String> {
        let v = self.try_status(id, name)?;
        let r = &v["replication"];
        let n = |k: &str| r[k].as_u64().ok_or_else(|| format!("node {id}: no replication.{k} in {v}"));
        Ok(Repl {
            leader: n("leader")?,
            term: n("term")?,
            commit_index: n("commit_index")?,
            applied_index: n("applied_index")?,
            allocated_bytes: v["allocated_bytes"].as_u64().unwrap_or(0),
            log_first_index: r["log_first_index"].as_u64().unwrap_or(0),
            rebuilds: r["rebuilds"].as_array().cloned().unwrap_or_default(),
        })
    }

    /// Like [`try_repl`](Self::try_repl), panicking on error.
    #[track_caller]
    pub fn repl(&self, id: u64, name: &str) -> Repl {
        self.try_repl(id, name).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Panic messages in any node's log (a Raft thread that panicked leaves the
    /// process running, so polling for progress would otherwise just time out).
    pub fn panics(&self) -> Vec<String> {
        let mut out = Vec::new();
        for n in &self.nodes {
            let log = n.log();
            let mut lines = log.lines();
            while let Some(l) = lines.next() {
                if l.contains("panicked at") {
                    out.push(format!("node {}: {l} {}", n.id, lines.next().unwrap_or_default()));
                }
            }
        }
        out
    }

    #[track_caller]
    fn assert_no_panics(&self) {
        let p = self.panics();
        assert!(p.is_empty(), "a node panicked: {p:#?}");
    }

    /// The leader's commit index once its published status has settled (the
    /// status is republished every Raft tick, so right after an acknowledged
    /// write it may be a tick behind).
    #[track_caller]
    pub fn settled_commit(&self, name: &str, leader: u64) -> u64 {
        let mut last = self.repl(leader, name).commit_index;
        poll(
            &format!("the commit index of {name:?} on node {leader} to settle"),
            Duration::from_secs(30),
            || {
                std::thread::sleep(Duration::from_millis(150));
                let now = self.try_repl(leader, name)?.commit_index;
                if now == last {
                    Ok(now)
                } else {
                    last = now;
                    Err(format!("moved to {now}"))
                }
            },
        )
    }

    /// Waits until every node in `among` names the same leader, that leader is in
    /// `among`, and it says so itself; returns its id.
    #[track_caller]
    pub fn wait_leader(&self, name: &str, among: &[u64], limit: Duration) -> u64 {
        poll(&format!("one leader of {name:?} among nodes {among:?}"), limit, || {
            self.assert_no_panics();
            let views: Vec<(u64, Repl)> =
                among.iter().map(|&id| self.try_repl(id, name).map(|r| (id, r))).collect::<Result<_, _>>()?;
            let leader = views[0].1.leader;
            let agreed = leader != 0
                && among.contains(&leader)
                && views.iter().all(|(_, r)| r.leader == leader)
                && views.iter().any(|(id, _)| *id == leader);
            if agreed {
                Ok(leader)
            } else {
                Err(format!("{views:?}"))
            }
        })
    }

    /// Waits until node `id`'s copy of `name` has applied at least `index`.
    #[track_caller]
    pub fn wait_applied(&self, name: &str, id: u64, index: u64, limit: Duration) -> Repl {
        poll(&format!("node {id} to apply {name:?} up to index {index}"), limit, || {
            self.assert_no_panics();
            let r = self.try_repl(id, name)?;
            if r.applied_index >= index {
                Ok(r)
            } else {
                Err(format!("{r:?}"))
            }
        })
    }

    /// Cuts node `id` off from `peers`, both ways (`POST /v1/debug/faults`);
    /// an empty list heals.
    #[track_caller]
    pub fn partition(&self, id: u64, peers: &[u64]) {
        let body =
            format!("{{\"block\":[{}]}}", peers.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(","));
        let (code, answer) = http_post_json(self.node(id).api_addr, "/v1/debug/faults", &body)
            .unwrap_or_else(|e| panic!("POST /v1/debug/faults on node {id}: {e}"));
        assert!(
            (200..300).contains(&code),
            "POST /v1/debug/faults {body} on node {id}: HTTP {code}: {answer}"
        );
    }

    /// Makes node `id` drop everything `peers` send it, while its own messages still reach
    /// them (a one-way partition: its requests arrive, their answers do not).
    #[track_caller]
    pub fn deafen(&self, id: u64, peers: &[u64]) {
        let list = peers.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(",");
        let body = format!("{{\"block_inbound\":[{list}]}}");
        let (code, answer) = http_post_json(self.node(id).api_addr, "/v1/debug/faults", &body)
            .unwrap_or_else(|e| panic!("POST /v1/debug/faults on node {id}: {e}"));
        assert!(
            (200..300).contains(&code),
            "POST /v1/debug/faults {body} on node {id}: HTTP {code}: {answer}"
        );
    }

    /// Heals every cut made on node `id`.
    #[track_caller]
    pub fn heal(&self, id: u64) {
        self.partition(id, &[]);
    }

    /// Prints the last `lines` lines of every node's log to stderr.
    pub fn print_logs(&self, lines: usize) {
        for n in &self.nodes {
            let log = n.log();
            let tail: Vec<&str> = log.lines().rev().take(lines).collect();
            eprintln!(
                "---- node {} raftblkd log (last {} lines) ----\n{}",
                n.id,
                tail.len(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.kill_all();
        if std::thread::panicking() {
            self.print_logs(80);
        }
    }
}

// ---------------------------------------------------------------------------
// fio

/// What a fio run with `--output-format=json` reported for its (single) job.
#[derive(Debug, Clone)]
pub struct FioReport {
    /// The job's `error` (0: none).
    pub error: i64,
    /// Writes completed.
    pub write_ios: u64,
    /// Reads completed (verify reads).
    pub read_ios: u64,
    /// Largest write completion latency.
    pub write_clat_max: Duration,
    /// Largest read completion latency.
    pub read_clat_max: Duration,
}

/// Parses fio's JSON output (fio may print warnings before the JSON object).
pub fn parse_fio_json(text: &str) -> Result<FioReport, String> {
    let start = text.find('{').ok_or_else(|| format!("no JSON in fio output: {text}"))?;
    let v: serde_json::Value =
        serde_json::from_str(&text[start..]).map_err(|e| format!("fio JSON ({e}): {text}"))?;
    let job = &v["jobs"][0];
    let ns = |dir: &str| Duration::from_nanos(job[dir]["clat_ns"]["max"].as_u64().unwrap_or(0));
    Ok(FioReport {
        error: job["error"].as_i64().ok_or_else(|| format!("no jobs[0].error: {text}"))?,
        write_ios: job["write"]["total_ios"].as_u64().unwrap_or(0),
        read_ios: job["read"]["total_ios"].as_u64().unwrap_or(0),
        write_clat_max: ns("write"),
        read_clat_max: ns("read"),
    })
}

/// From a fio latency log (`--write_lat_log` with `--log_avg_msec=0`: one line
/// per I/O, first field the completion time in ms since the job started),
/// the longest stretch without any completion, and when it began (ms).
pub fn longest_completion_gap(log: &str) -> (Duration, u64) {
    let mut times: Vec<u64> =
        log.lines().filter_map(|l| l.split(',').next().and_then(|t| t.trim().parse().ok())).collect();
    times.sort_unstable();
    times
        .windows(2)
        .map(|w| (w[1] - w[0], w[0]))
        .max()
        .map_or((Duration::ZERO, 0), |(gap, at)| (Duration::from_millis(gap), at))
}

/// `sha256sum` of whatever `shell_producer` writes to stdout (run with bash -o pipefail).
pub fn sha256_of_stream(shell_producer: &str) -> String {
    let out = run("bash", &["-o", "pipefail", "-c", &format!("{shell_producer} | sha256sum")]);
    out.ok().split_whitespace().next().expect("sha256sum printed a digest").to_string()
}

/// A raftblkd command with the settings every test daemon shares: its own data dir,
/// NBD/API addresses and socket, a log file for stdout and stderr, and no RAFTBLK_*
/// variables inherited from the test's environment.
fn daemon_command(
    daemon_bin: &Path,
    log_path: &Path,
    data_dir: &Path,
    nbd_addr: SocketAddr,
    api_addr: SocketAddr,
    socket: &Path,
    kek: Option<&str>,
) -> Result<Command, String> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .map_err(|e| format!("cannot open log: {e}"))?;
    let mut cmd = Command::new(daemon_bin);
    for (k, _) in std::env::vars() {
        if k.starts_with("RAFTBLK_") {
            cmd.env_remove(k);
        }
    }
    cmd.arg("--data-dir")
        .arg(data_dir)
        .arg("--nbd-listen")
        .arg(nbd_addr.to_string())
        .arg("--api-listen")
        .arg(api_addr.to_string())
        .arg("--nbd-socket")
        .arg(socket)
        .env("RUST_LOG", std::env::var("RAFTBLK_TEST_LOG").unwrap_or_else(|_| "info".into()))
        .envs(kek.map(|k| ("RAFTBLK_KEK", k.to_string())))
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log);
    Ok(cmd)
}

/// Sends SIGTERM to `child` and waits up to `timeout` for it to exit; `None` (after
/// killing it) if it did not.
fn sigterm_and_wait(mut child: Child, timeout: Duration) -> Option<ExitStatus> {
    let pid = child.id().to_string();
    let st = Command::new("kill").args(["-TERM", &pid]).status().expect("run kill");
    assert!(st.success(), "kill -TERM {pid} failed");
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------
// On-disk tampering and inspection (integrity tests)

/// Every file under `dir` (recursively) that contains `needle`.
pub fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(bytes) = std::fs::read(&p) {
                if bytes.windows(needle.len()).any(|w| w == needle) {
                    hits.push(p);
                }
            }
        }
    }
    hits
}

/// Flips one byte of `path` at `offset`.
pub fn flip(path: &Path, offset: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().read(true).write(true).open(path).expect("open for tampering");
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).expect("read");
    b[0] ^= 0x5a;
    f.write_all_at(&b, offset).expect("write");
}

/// Swaps two 4 KiB blocks of the data file and their metadata pairs.
pub fn swap_blocks(img: &Path, a: u64, b: u64) {
    use std::os::unix::fs::FileExt;
    let meta = img.with_extension("meta");
    for (path, unit, base) in [(img.to_path_buf(), 4096u64, 0u64), (meta, 128, 4096)] {
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&path).expect("open");
        let (mut x, mut y) = (vec![0u8; unit as usize], vec![0u8; unit as usize]);
        f.read_exact_at(&mut x, base + a * unit).expect("read a");
        f.read_exact_at(&mut y, base + b * unit).expect("read b");
        f.write_all_at(&y, base + a * unit).expect("write a");
        f.write_all_at(&x, base + b * unit).expect("write b");
    }
}

/// Every nonce found in an encrypted volume's metadata file (both slots of every block).
pub fn nonces_in(meta: &Path) -> Vec<[u8; 12]> {
    let bytes = std::fs::read(meta).expect("read metadata");
    let mut out = Vec::new();
    for rec in bytes[4096.min(bytes.len())..].chunks_exact(64) {
        // kind 1 (sealed), cipher 1 (AES-GCM): the record's own crc is not checked here,
        // a torn record would only add a spurious nonce, never hide a repeat.
        if rec[4] == 1 && rec[6] == 1 {
            let mut n = [0u8; 12];
            n.copy_from_slice(&rec[32..44]);
            out.push(n);
        }
    }
    out
}

/// The value of the first series of metric `name` on the API at `addr` whose labels include
/// every one of `labels` (0 if there is none).
pub fn metric_value(addr: SocketAddr, name: &str, labels: &[&str]) -> u64 {
    let (_, body) = http_get(addr, "/metrics").unwrap_or_else(|e| panic!("GET /metrics from {addr}: {e}"));
    body.lines()
        .find(|l| l.starts_with(name) && labels.iter().all(|x| l.contains(x)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}
