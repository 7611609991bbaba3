//! The wire protocol between the host runtime and the guest init.
//!
//! One reliable byte stream connects them (a virtio-serial port under QEMU, a vsock
//! connection under Firecracker). Everything — the program's stdin, stdout and stderr, its
//! exit status, `exec` requests, signals and statistics — is multiplexed on it as frames:
//!
//! ```text
//! +----------------+--------+---------------------------+
//! | length: u32 LE | tag u8 | payload (length - 1 bytes) |
//! +----------------+--------+---------------------------+
//! ```
//!
//! Integers are little-endian; byte strings and UTF-8 strings are a `u32` length followed by
//! the bytes; lists are a `u32` count followed by the items; an optional value is a `u8`
//! presence flag followed by the value. A frame larger than [`MAX_FRAME`] is a protocol error.
//!
//! The [`GuestConfig`] that tells the guest init what to run uses the same encoding and is
//! stored in the initramfs at [`CONFIG_PATH`].

use std::fmt;

/// Largest frame (tag + payload) either side accepts.
pub const MAX_FRAME: usize = 4 << 20;
/// Largest chunk of stdio data put in one frame.
pub const MAX_CHUNK: usize = 64 << 10;
/// Where the guest config lives inside the initramfs.
pub const CONFIG_PATH: &str = "/etc/symbiont/config.bin";
/// Directory inside the initramfs holding the workspace files before they are copied.
pub const FILES_DIR: &str = "/etc/symbiont/files";
/// Name of the virtio-serial port carrying the channel.
pub const VIRTIO_PORT_NAME: &str = "symbiont.0";
/// vsock port the guest connects to on the host (CID 2) under Firecracker.
pub const VSOCK_PORT: u32 = 1024;
/// Kernel command-line key selecting the channel: `virtio-serial` or `vsock`.
pub const CMDLINE_CHANNEL: &str = "symbiont.channel";

/// A decoding error: the peer sent something this side does not understand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError(pub String);

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "guest protocol: {}", self.0)
    }
}

impl std::error::Error for ProtocolError {}

fn err<T>(msg: impl Into<String>) -> Result<T, ProtocolError> {
    Err(ProtocolError(msg.into()))
}

/// Appends encoded values to a byte buffer.
#[derive(Default, Debug)]
pub struct Encoder {
    buf: Vec<u8>,
}

impl Encoder {
    /// An empty encoder.
    pub fn new() -> Self {
        Self::default()
    }
    /// The bytes written so far.
    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }
    /// A `u8`.
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }
    /// A `bool` as one byte.
    pub fn bool(&mut self, v: bool) -> &mut Self {
        self.u8(u8::from(v))
    }
    /// A `u32`.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// An `i32`.
    pub fn i32(&mut self, v: i32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// A `u64`.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// A length-prefixed byte string.
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.u32(v.len() as u32);
        self.buf.extend_from_slice(v);
        self
    }
    /// A length-prefixed UTF-8 string.
    pub fn str(&mut self, v: &str) -> &mut Self {
        self.bytes(v.as_bytes())
    }
    /// A list of strings.
    pub fn strs(&mut self, v: &[String]) -> &mut Self {
        self.u32(v.len() as u32);
        for s in v {
            self.str(s);
        }
        self
    }
    /// An optional `i32`.
    pub fn opt_i32(&mut self, v: Option<i32>) -> &mut Self {
        match v {
            Some(x) => self.u8(1).i32(x),
            None => self.u8(0),
        }
    }
}

/// Reads encoded values from a byte slice.
#[derive(Debug)]
pub struct Decoder<'a> {
    buf: &'a [u8],
}

impl<'a> Decoder<'a> {
    /// A decoder over `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if self.buf.len() < n {
            return err(format!(
                "truncated: need {n} bytes, have {}",
                self.buf.len()
            ));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    /// Fails unless every byte was consumed.
    pub fn finish(&self) -> Result<(), ProtocolError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            err(format!("{} trailing bytes", self.buf.len()))
        }
    }
    /// A `u8`.
    pub fn u8(&mut self) -> Result<u8, ProtocolError> {
        Ok(self.take(1)?[0])
    }
    /// A `bool`.
    pub fn bool(&mut self) -> Result<bool, ProtocolError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            b => err(format!("invalid bool {b}")),
        }
    }
    /// A `u32`.
    pub fn u32(&mut self) -> Result<u32, ProtocolError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    /// An `i32`.
    pub fn i32(&mut self) -> Result<i32, ProtocolError> {
        Ok(self.u32()? as i32)
    }
    /// A `u64`.
    pub fn u64(&mut self) -> Result<u64, ProtocolError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    /// A length-prefixed byte string.
    pub fn bytes(&mut self) -> Result<Vec<u8>, ProtocolError> {
        let n = self.u32()? as usize;
        Ok(self.take(n)?.to_vec())
    }
    /// A length-prefixed UTF-8 string.
    pub fn str(&mut self) -> Result<String, ProtocolError> {
        String::from_utf8(self.bytes()?).map_err(|_| ProtocolError("invalid UTF-8".into()))
    }
    /// A list of strings.
    pub fn strs(&mut self) -> Result<Vec<String>, ProtocolError> {
        let n = self.u32()? as usize;
        if n > self.buf.len() {
            return err(format!("list of {n} items cannot fit"));
        }
        (0..n).map(|_| self.str()).collect()
    }
    /// An optional `i32`.
    pub fn opt_i32(&mut self) -> Result<Option<i32>, ProtocolError> {
        if self.bool()? {
            Ok(Some(self.i32()?))
        } else {
            Ok(None)
        }
    }
}

/// Wraps an encoded message (tag + payload) into a frame.
fn frame(tag: u8, payload: Encoder) -> Vec<u8> {
    let payload = payload.into_bytes();
    let mut out = Vec::with_capacity(payload.len() + 5);
    out.extend_from_slice(&((payload.len() + 1) as u32).to_le_bytes());
    out.push(tag);
    out.extend_from_slice(&payload);
    out
}

/// One complete frame found at the start of a buffer: its tag, its payload and how many
/// bytes of the buffer it took.
pub type RawFrame<'a> = (u8, &'a [u8], usize);

/// Splits the first complete frame off `buf`: `Ok(None)` when more bytes are needed,
/// otherwise the tag, the payload and the number of bytes consumed.
pub fn split_frame(buf: &[u8]) -> Result<Option<RawFrame<'_>>, ProtocolError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len == 0 {
        return err("empty frame");
    }
    if len > MAX_FRAME {
        return err(format!("frame of {len} bytes exceeds {MAX_FRAME}"));
    }
    if buf.len() < 4 + len {
        return Ok(None);
    }
    Ok(Some((buf[4], &buf[5..4 + len], 4 + len)))
}

/// Messages from the host to the guest init.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMsg {
    /// First frame after the host connects: tells the guest the channel is up (a virtio-serial
    /// port reads end-of-file until the host side is known to be connected).
    Hello,
    /// Bytes for the program's stdin.
    Stdin(Vec<u8>),
    /// The host closed the program's stdin.
    StdinEof,
    /// Send this signal to the program.
    Signal(i32),
    /// Run a command next to the program and answer with [`GuestMsg::ExecDone`].
    Exec {
        /// Request id echoed in the answer.
        id: u32,
        /// Program and arguments.
        argv: Vec<String>,
        /// Kill it after this many milliseconds.
        timeout_ms: u64,
    },
    /// Answer with [`GuestMsg::Stats`].
    Stats {
        /// Request id echoed in the answer.
        id: u32,
    },
    /// The host has the exit status; power off now.
    Shutdown,
}

impl HostMsg {
    /// Encodes the message as one frame.
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Encoder::new();
        let tag = match self {
            HostMsg::Stdin(data) => {
                e.bytes(data);
                1
            }
            HostMsg::StdinEof => 2,
            HostMsg::Signal(sig) => {
                e.i32(*sig);
                3
            }
            HostMsg::Exec {
                id,
                argv,
                timeout_ms,
            } => {
                e.u32(*id).strs(argv).u64(*timeout_ms);
                4
            }
            HostMsg::Stats { id } => {
                e.u32(*id);
                5
            }
            HostMsg::Shutdown => 6,
            HostMsg::Hello => 7,
        };
        frame(tag, e)
    }

    /// Decodes a frame's tag and payload (see [`split_frame`]).
    pub fn decode(tag: u8, payload: &[u8]) -> Result<Self, ProtocolError> {
        let mut d = Decoder::new(payload);
        let msg = match tag {
            1 => HostMsg::Stdin(d.bytes()?),
            2 => HostMsg::StdinEof,
            3 => HostMsg::Signal(d.i32()?),
            4 => HostMsg::Exec {
                id: d.u32()?,
                argv: d.strs()?,
                timeout_ms: d.u64()?,
            },
            5 => HostMsg::Stats { id: d.u32()? },
            6 => HostMsg::Shutdown,
            7 => HostMsg::Hello,
            t => return err(format!("unknown host message tag {t}")),
        };
        d.finish()?;
        Ok(msg)
    }
}

/// How the program ended, as the guest saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestExit {
    /// Exit code when it exited.
    pub code: Option<i32>,
    /// Signal when one ended it.
    pub signal: Option<i32>,
    /// The guest kernel's OOM killer killed it (its memory cgroup hit its limit).
    pub oom_killed: bool,
}

/// Usage figures the guest reads from the program's cgroup and network interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GuestStats {
    /// `memory.current` of the program's cgroup.
    pub memory_bytes: u64,
    /// `memory.peak` of the program's cgroup (0 when the kernel lacks it).
    pub memory_peak_bytes: u64,
    /// `usage_usec` of the cgroup's `cpu.stat`, in microseconds.
    pub cpu_usec: u64,
    /// `pids.current` of the program's cgroup.
    pub pids: u64,
    /// Bytes received on `eth0` (0 without network).
    pub net_rx_bytes: u64,
    /// Bytes sent on `eth0` (0 without network).
    pub net_tx_bytes: u64,
}

/// Messages from the guest init to the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestMsg {
    /// The program was started with this pid (guest pid).
    Started {
        /// Guest pid of the program.
        pid: u32,
    },
    /// Bytes the program wrote to stdout.
    Stdout(Vec<u8>),
    /// Bytes the program wrote to stderr.
    Stderr(Vec<u8>),
    /// The program's stdout reached end-of-file.
    StdoutEof,
    /// The program's stderr reached end-of-file.
    StderrEof,
    /// The program ended; sent after both EOFs.
    Exit(GuestExit),
    /// Answer to [`HostMsg::Exec`].
    ExecDone {
        /// The request id.
        id: u32,
        /// Exit code, `-1` when killed by a signal, `127` when it could not be started.
        code: i32,
        /// Its stdout.
        stdout: Vec<u8>,
        /// Its stderr.
        stderr: Vec<u8>,
    },
    /// Answer to [`HostMsg::Stats`].
    Stats {
        /// The request id.
        id: u32,
        /// The figures.
        stats: GuestStats,
    },
    /// The guest init hit an error it cannot recover from (it powers off next).
    Error(String),
}

impl GuestMsg {
    /// Encodes the message as one frame.
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Encoder::new();
        let tag = match self {
            GuestMsg::Started { pid } => {
                e.u32(*pid);
                0x81
            }
            GuestMsg::Stdout(d) => {
                e.bytes(d);
                0x82
            }
            GuestMsg::Stderr(d) => {
                e.bytes(d);
                0x83
            }
            GuestMsg::StdoutEof => 0x84,
            GuestMsg::StderrEof => 0x85,
            GuestMsg::Exit(x) => {
                e.opt_i32(x.code).opt_i32(x.signal).bool(x.oom_killed);
                0x86
            }
            GuestMsg::ExecDone {
                id,
                code,
                stdout,
                stderr,
            } => {
                e.u32(*id).i32(*code).bytes(stdout).bytes(stderr);
                0x87
            }
            GuestMsg::Stats { id, stats } => {
                e.u32(*id)
                    .u64(stats.memory_bytes)
                    .u64(stats.memory_peak_bytes)
                    .u64(stats.cpu_usec)
                    .u64(stats.pids)
                    .u64(stats.net_rx_bytes)
                    .u64(stats.net_tx_bytes);
                0x88
            }
            GuestMsg::Error(m) => {
                e.str(m);
                0x89
            }
        };
        frame(tag, e)
    }

    /// Decodes a frame's tag and payload (see [`split_frame`]).
    pub fn decode(tag: u8, payload: &[u8]) -> Result<Self, ProtocolError> {
        let mut d = Decoder::new(payload);
        let msg = match tag {
            0x81 => GuestMsg::Started { pid: d.u32()? },
            0x82 => GuestMsg::Stdout(d.bytes()?),
            0x83 => GuestMsg::Stderr(d.bytes()?),
            0x84 => GuestMsg::StdoutEof,
            0x85 => GuestMsg::StderrEof,
            0x86 => GuestMsg::Exit(GuestExit {
                code: d.opt_i32()?,
                signal: d.opt_i32()?,
                oom_killed: d.bool()?,
            }),
            0x87 => GuestMsg::ExecDone {
                id: d.u32()?,
                code: d.i32()?,
                stdout: d.bytes()?,
                stderr: d.bytes()?,
            },
            0x88 => GuestMsg::Stats {
                id: d.u32()?,
                stats: GuestStats {
                    memory_bytes: d.u64()?,
                    memory_peak_bytes: d.u64()?,
                    cpu_usec: d.u64()?,
                    pids: d.u64()?,
                    net_rx_bytes: d.u64()?,
                    net_tx_bytes: d.u64()?,
                },
            },
            0x89 => GuestMsg::Error(d.str()?),
            t => return err(format!("unknown guest message tag {t:#x}")),
        };
        d.finish()?;
        Ok(msg)
    }
}

/// The guest's network settings (QEMU user networking or a tap device).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// The guest's address with prefix, e.g. `10.0.2.15/24`.
    pub address: String,
    /// The default gateway, e.g. `10.0.2.2` (the host under QEMU user networking).
    pub gateway: String,
    /// Egress/ingress ceiling in bits per second applied by the guest kernel; 0 = none.
    pub rate_bps: u64,
}

/// What the guest init runs and how: written by the runtime into the initramfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestConfig {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Environment (`KEY`, `VALUE`) pairs; nothing else is inherited.
    pub env: Vec<(String, String)>,
    /// Working directory.
    pub workdir: String,
    /// Unprivileged uid the program runs as.
    pub uid: u32,
    /// Its gid.
    pub gid: u32,
    /// Memory ceiling of the program's cgroup in bytes; 0 = none.
    pub memory_limit_bytes: u64,
    /// Most tasks in the program's cgroup; 0 = none.
    pub pids_limit: u64,
    /// Kernel modules to load, in order (paths inside the initramfs).
    pub modules: Vec<String>,
    /// Block device holding the workspace (ext4), or `None` for a tmpfs workspace.
    pub workspace_device: Option<String>,
    /// Network settings, `None` for no network (only `lo`).
    pub network: Option<NetConfig>,
}

impl GuestConfig {
    /// Encodes the config (without frame header).
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Encoder::new();
        e.u32(1); // format version
        e.strs(&self.argv);
        e.u32(self.env.len() as u32);
        for (k, v) in &self.env {
            e.str(k).str(v);
        }
        e.str(&self.workdir)
            .u32(self.uid)
            .u32(self.gid)
            .u64(self.memory_limit_bytes)
            .u64(self.pids_limit)
            .strs(&self.modules);
        match &self.workspace_device {
            Some(dev) => e.u8(1).str(dev),
            None => e.u8(0),
        };
        match &self.network {
            Some(n) => e.u8(1).str(&n.address).str(&n.gateway).u64(n.rate_bps),
            None => e.u8(0),
        };
        e.into_bytes()
    }

    /// Decodes what [`GuestConfig::encode`] wrote.
    pub fn decode(buf: &[u8]) -> Result<Self, ProtocolError> {
        let mut d = Decoder::new(buf);
        let version = d.u32()?;
        if version != 1 {
            return err(format!("unsupported config version {version}"));
        }
        let argv = d.strs()?;
        let n = d.u32()? as usize;
        if n > buf.len() {
            return err("env list cannot fit");
        }
        let mut env = Vec::with_capacity(n);
        for _ in 0..n {
            env.push((d.str()?, d.str()?));
        }
        let workdir = d.str()?;
        let uid = d.u32()?;
        let gid = d.u32()?;
        let memory_limit_bytes = d.u64()?;
        let pids_limit = d.u64()?;
        let modules = d.strs()?;
        let workspace_device = if d.bool()? { Some(d.str()?) } else { None };
        let network = if d.bool()? {
            Some(NetConfig {
                address: d.str()?,
                gateway: d.str()?,
                rate_bps: d.u64()?,
            })
        } else {
            None
        };
        d.finish()?;
        Ok(Self {
            argv,
            env,
            workdir,
            uid,
            gid,
            memory_limit_bytes,
            pids_limit,
            modules,
            workspace_device,
            network,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip_guest(m: GuestMsg) {
        let bytes = m.encode();
        let (tag, payload, used) = split_frame(&bytes).expect("valid").expect("complete");
        assert_eq!(used, bytes.len());
        assert_eq!(GuestMsg::decode(tag, payload).expect("decodes"), m);
    }

    fn roundtrip_host(m: HostMsg) {
        let bytes = m.encode();
        let (tag, payload, used) = split_frame(&bytes).expect("valid").expect("complete");
        assert_eq!(used, bytes.len());
        assert_eq!(HostMsg::decode(tag, payload).expect("decodes"), m);
    }

    #[test]
    fn every_message_roundtrips() {
        roundtrip_host(HostMsg::Stdin(b"abc\0\xff".to_vec()));
        roundtrip_host(HostMsg::StdinEof);
        roundtrip_host(HostMsg::Signal(15));
        roundtrip_host(HostMsg::Exec {
            id: 7,
            argv: vec!["/bin/sh".into(), "-c".into(), "echo é".into()],
            timeout_ms: 1500,
        });
        roundtrip_host(HostMsg::Stats { id: 9 });
        roundtrip_host(HostMsg::Shutdown);
        roundtrip_host(HostMsg::Hello);
        roundtrip_guest(GuestMsg::Started { pid: 42 });
        roundtrip_guest(GuestMsg::Stdout(vec![1, 2, 3]));
        roundtrip_guest(GuestMsg::Stderr(vec![]));
        roundtrip_guest(GuestMsg::StdoutEof);
        roundtrip_guest(GuestMsg::StderrEof);
        roundtrip_guest(GuestMsg::Exit(GuestExit {
            code: None,
            signal: Some(9),
            oom_killed: true,
        }));
        roundtrip_guest(GuestMsg::ExecDone {
            id: 1,
            code: -1,
            stdout: b"out".to_vec(),
            stderr: b"err".to_vec(),
        });
        roundtrip_guest(GuestMsg::Stats {
            id: 3,
            stats: GuestStats {
                memory_bytes: 1,
                memory_peak_bytes: 2,
                cpu_usec: 3,
                pids: 4,
                net_rx_bytes: 5,
                net_tx_bytes: u64::MAX,
            },
        });
        roundtrip_guest(GuestMsg::Error("boom".into()));
    }

    #[test]
    fn split_frame_waits_for_complete_frames() {
        let bytes = GuestMsg::Stdout(b"hello".to_vec()).encode();
        for cut in 0..bytes.len() {
            assert_eq!(split_frame(&bytes[..cut]).expect("valid prefix"), None);
        }
        let mut two = bytes.clone();
        two.extend_from_slice(&GuestMsg::StdoutEof.encode());
        let (_, _, used) = split_frame(&two).expect("valid").expect("complete");
        assert_eq!(used, bytes.len());
    }

    #[test]
    fn oversized_and_garbage_frames_are_rejected() {
        let mut big = ((MAX_FRAME + 1) as u32).to_le_bytes().to_vec();
        big.push(0x82);
        assert!(split_frame(&big).is_err());
        assert!(split_frame(&[0, 0, 0, 0]).is_err());
        assert!(GuestMsg::decode(0x7f, &[]).is_err());
        assert!(HostMsg::decode(4, &[1, 0]).is_err());
        // trailing bytes are an error, not silently ignored
        assert!(HostMsg::decode(2, &[0]).is_err());
        // a list count larger than the payload cannot allocate unbounded memory
        assert!(HostMsg::decode(4, &[1, 0, 0, 0, 0xff, 0xff, 0xff, 0x7f]).is_err());
    }

    #[test]
    fn config_roundtrips() {
        let cfg = GuestConfig {
            argv: vec!["/bin/sh".into(), "-c".into(), "echo hi".into()],
            env: vec![("A".into(), "b=c".into())],
            workdir: "/workspace".into(),
            uid: 1000,
            gid: 1000,
            memory_limit_bytes: 64 << 20,
            pids_limit: 256,
            modules: vec!["/lib/modules/virtio.ko".into()],
            workspace_device: Some("/dev/vda".into()),
            network: Some(NetConfig {
                address: "10.0.2.15/24".into(),
                gateway: "10.0.2.2".into(),
                rate_bps: 10_000_000,
            }),
        };
        assert_eq!(GuestConfig::decode(&cfg.encode()).expect("decodes"), cfg);
        let none = GuestConfig {
            workspace_device: None,
            network: None,
            ..cfg
        };
        assert_eq!(GuestConfig::decode(&none.encode()).expect("decodes"), none);
    }
}
