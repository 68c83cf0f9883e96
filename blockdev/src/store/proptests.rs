//! Property tests of the file store: random operation sequences applied to a
//! [`FileBackend`] and to the [`MemBackend`] model, for each engine; and the
//! io_uring engine against the sync engine, file against file.

use std::sync::OnceLock;

use bytes::Bytes;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

use super::{AlignedBuf, EngineKind, FileBackend, IoEngine, MemBackend};
use crate::backend::{BlockBackend, ExtentKind};

const SIZE_START_BYTES: u64 = 256 * 1024;
/// Offsets reach a little past the starting size, so some requests fall off the end.
const OFFSET_MAX: u64 = 300 * 1024;

#[derive(Debug, Clone)]
enum Op {
    Write { offset: u64, len: usize, seed: u8, aligned_buf: bool, fua: bool },
    Read { offset: u64, len: u32 },
    Trim { offset: u64, len: u64 },
    WriteZeroes { offset: u64, len: u64, may_trim: bool },
    BlockStatus { offset: u64, len: u64 },
    Flush,
    Grow { add: u64 },
}

/// Half block-aligned, half anywhere.
fn offset() -> impl Strategy<Value = u64> {
    prop_oneof![(0..OFFSET_MAX / 4096).prop_map(|b| b * 4096), 0..OFFSET_MAX]
}

/// Whole blocks, any length, or a single byte.
fn len() -> impl Strategy<Value = u64> {
    prop_oneof![(1..5u64).prop_map(|n| n * 4096), 1..20_000u64, Just(1u64)]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (offset(), len(), any::<u8>(), any::<bool>(), prop::bool::weighted(0.1)).prop_map(
            |(offset, len, seed, aligned_buf, fua)| Op::Write { offset, len: len as usize, seed, aligned_buf, fua }
        ),
        4 => (offset(), len()).prop_map(|(offset, len)| Op::Read { offset, len: len as u32 }),
        2 => (offset(), len()).prop_map(|(offset, len)| Op::Trim { offset, len }),
        2 => (offset(), len(), any::<bool>())
            .prop_map(|(offset, len, may_trim)| Op::WriteZeroes { offset, len, may_trim }),
        1 => (offset(), len()).prop_map(|(offset, len)| Op::BlockStatus { offset, len }),
        1 => Just(Op::Flush),
        1 => (1..16u64).prop_map(|n| Op::Grow { add: n * 4096 - 7 }),
    ]
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(op(), 1..60)
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime")
    })
}

/// The shared engine of a kind, or `None` if io_uring is unavailable here.
fn engine(kind: EngineKind) -> Option<IoEngine> {
    static SYNC: OnceLock<IoEngine> = OnceLock::new();
    static URING: OnceLock<Option<IoEngine>> = OnceLock::new();
    match kind {
        EngineKind::Uring => URING
            .get_or_init(|| match IoEngine::start(EngineKind::Uring, 2) {
                Ok(e) => Some(e),
                Err(e) => {
                    eprintln!("skipping io_uring property tests: {e}");
                    None
                }
            })
            .clone(),
        _ => Some(SYNC.get_or_init(|| IoEngine::start(EngineKind::Sync, 1).expect("sync engine")).clone()),
    }
}

fn payload(len: usize, seed: u8, aligned_buf: bool) -> Bytes {
    let data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(seed | 1).wrapping_add(seed)).collect();
    if aligned_buf {
        AlignedBuf::copy_from(&data).into_bytes()
    } else {
        // Start one byte into a larger allocation, so the buffer is misaligned.
        let mut v = vec![0u8; len + 1];
        v[1..].copy_from_slice(&data);
        Bytes::from(v).slice(1..)
    }
}

/// Applies `op` to both backends; results must agree (both `Ok` with equal data,
/// or both `Err`). `grow` grows `a` and `b`.
async fn apply_both(
    op: &Op,
    a: &dyn BlockBackend,
    b: &dyn BlockBackend,
    grow: &dyn Fn(u64) -> Result<(), TestCaseError>,
) -> Result<(), TestCaseError> {
    let same = |ra: bool, rb: bool, what: &str| {
        prop_assert_eq!(ra, rb, "{:?}: {} disagree on success", op, what);
        Ok(())
    };
    match *op {
        Op::Write { offset, len, seed, aligned_buf, fua } => {
            let data = payload(len, seed, aligned_buf);
            let ra = a.write(offset, data.clone(), fua).await;
            let rb = b.write(offset, data, fua).await;
            same(ra.is_ok(), rb.is_ok(), "writes")?;
        }
        Op::Read { offset, len } => match (a.read(offset, len).await, b.read(offset, len).await) {
            (Ok(x), Ok(y)) => prop_assert!(x == y, "{:?}: reads differ", op),
            (ra, rb) => same(ra.is_ok(), rb.is_ok(), "reads")?,
        },
        Op::Trim { offset, len } => {
            let (ra, rb) = (a.trim(offset, len).await, b.trim(offset, len).await);
            same(ra.is_ok(), rb.is_ok(), "trims")?;
        }
        Op::WriteZeroes { offset, len, may_trim } => {
            let ra = a.write_zeroes(offset, len, may_trim, false).await;
            let rb = b.write_zeroes(offset, len, may_trim, false).await;
            same(ra.is_ok(), rb.is_ok(), "write_zeroes")?;
        }
        Op::BlockStatus { offset, len } => {
            let (ra, rb) = (a.block_status(offset, len).await, b.block_status(offset, len).await);
            same(ra.is_ok(), rb.is_ok(), "block_status")?;
            // Allocation may legitimately differ; check each map on its own.
            for (backend, map) in [(a, ra), (b, rb)] {
                let Ok(map) = map else { continue };
                prop_assert!(!map.is_empty(), "{:?}: empty map", op);
                prop_assert!(map.iter().map(|e| e.len_bytes).sum::<u64>() <= len, "{:?}: map too long", op);
                prop_assert!(map.windows(2).all(|w| w[0].kind != w[1].kind), "{:?}: unmerged {:?}", op, map);
                let mut pos = offset;
                for e in &map {
                    prop_assert!(e.len_bytes > 0, "{:?}: empty extent", op);
                    if e.kind == ExtentKind::Hole {
                        let bytes = backend.read(pos, e.len_bytes as u32).await.map_err(fail)?;
                        prop_assert!(bytes.iter().all(|&x| x == 0), "{:?}: hole at {} holds data", op, pos);
                    }
                    pos += e.len_bytes;
                }
            }
        }
        Op::Flush => {
            a.flush().await.map_err(fail)?;
            b.flush().await.map_err(fail)?;
        }
        Op::Grow { add } => grow(a.size_bytes() + add)?,
    }
    prop_assert_eq!(a.size_bytes(), b.size_bytes());
    Ok(())
}

fn fail(e: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(e.to_string())
}

/// Reads the whole volume in chunks no larger than a `u32` length.
async fn contents(b: &dyn BlockBackend) -> Result<Vec<u8>, TestCaseError> {
    b.read(0, b.size_bytes() as u32).await.map(|x| x.to_vec()).map_err(fail)
}

/// FileBackend on `kind` against MemBackend.
fn check_against_model(kind: EngineKind, ops: &[Op]) -> Result<(), TestCaseError> {
    let Some(engine) = engine(kind) else { return Ok(()) };
    runtime().block_on(async {
        let dir = tempfile::tempdir().map_err(fail)?;
        let file = FileBackend::create(dir.path().join("vol"), SIZE_START_BYTES, engine).map_err(fail)?;
        let model = MemBackend::new(SIZE_START_BYTES);
        let grow = |size: u64| {
            file.grow(size).map_err(fail)?;
            model.grow(size);
            Ok(())
        };
        for op in ops {
            apply_both(op, &file, &model, &grow).await?;
        }
        prop_assert!(contents(&file).await? == contents(&model).await?, "final contents differ");
        file.flush().await.map_err(fail)?;
        let on_disk = std::fs::read(file.path()).map_err(fail)?;
        prop_assert_eq!(on_disk.len() as u64, model.size_bytes());
        prop_assert!(on_disk == contents(&model).await?, "file on disk differs from the model");
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn file_on_sync_engine_matches_model(ops in ops()) {
        check_against_model(EngineKind::Sync, &ops)?;
    }

    #[test]
    fn file_on_uring_engine_matches_model(ops in ops()) {
        check_against_model(EngineKind::Uring, &ops)?;
    }

    /// The same operations through io_uring and through sync leave byte-identical files.
    #[test]
    fn uring_and_sync_engines_write_identical_files(ops in ops()) {
        let (Some(uring), Some(sync)) = (engine(EngineKind::Uring), engine(EngineKind::Sync)) else {
            return Ok(());
        };
        runtime().block_on(async {
            let dir = tempfile::tempdir().map_err(fail)?;
            let u = FileBackend::create(dir.path().join("uring"), SIZE_START_BYTES, uring).map_err(fail)?;
            let s = FileBackend::create(dir.path().join("sync"), SIZE_START_BYTES, sync).map_err(fail)?;
            let grow = |size: u64| {
                u.grow(size).map_err(fail)?;
                s.grow(size).map_err(fail)?;
                Ok(())
            };
            for op in &ops {
                apply_both(op, &u, &s, &grow).await?;
            }
            u.flush().await.map_err(fail)?;
            s.flush().await.map_err(fail)?;
            let (fu, fs) = (std::fs::read(u.path()).map_err(fail)?, std::fs::read(s.path()).map_err(fail)?);
            prop_assert_eq!(fu.len(), fs.len());
            prop_assert!(fu == fs, "io_uring and sync files differ");
            Ok(())
        })?;
    }
}
