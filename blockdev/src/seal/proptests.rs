//! Property tests: a [`SealingBackend`] (plain and encrypted, over memory and over a
//! [`SealedFile`]) behaves like the plain in-memory model under any mix of requests; any
//! changed bit of an encrypted block or its seal is caught.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use bytes::Bytes;
use proptest::prelude::*;

use super::backend::{LogReporter, SealingBackend, VolumeCrypto};
use super::crypt::DataKey;
use super::mem::MemSealedStore;
use super::nonce::{MemReserver, NonceSource};
use super::{SealedStore, BLOCK, BLOCK_BYTES};
use crate::backend::BlockBackend;
use crate::store::{EngineKind, IoEngine, MemBackend, SealedFile};

const SIZE: u64 = 96 * BLOCK;

#[derive(Debug, Clone)]
enum Op {
    Write { offset: u64, len: usize, seed: u8 },
    Trim { offset: u64, len: u64 },
    Zero { offset: u64, len: u64, may_trim: bool },
    Read { offset: u64, len: u32 },
}

fn op() -> impl Strategy<Value = Op> {
    // Offsets mix block-aligned and arbitrary ones, so both the direct and the
    // read-modify-write paths run.
    let offset = prop_oneof![(0..SIZE / BLOCK).prop_map(|b| b * BLOCK), 0..SIZE];
    prop_oneof![
        4 => (offset.clone(), 1usize..(40 * BLOCK_BYTES), any::<u8>()).prop_map(|(offset, len, seed)| Op::Write { offset, len, seed }),
        1 => (offset.clone(), 0u64..(70 * BLOCK)).prop_map(|(offset, len)| Op::Trim { offset, len }),
        1 => (offset.clone(), 0u64..(70 * BLOCK), any::<bool>()).prop_map(|(offset, len, may_trim)| Op::Zero { offset, len, may_trim }),
        2 => (offset, 0u32..(40 * BLOCK as u32)).prop_map(|(offset, len)| Op::Read { offset, len }),
    ]
}

fn clip(offset: u64, len: u64) -> Option<(u64, u64)> {
    (offset < SIZE).then(|| (offset, len.min(SIZE - offset)))
}

async fn run(b: &SealingBackend, ops: &[Op]) {
    let model = MemBackend::new(SIZE);
    for (i, op) in ops.iter().enumerate() {
        match op.clone() {
            Op::Write { offset, len, seed } => {
                let Some((offset, len)) = clip(offset, len as u64) else { continue };
                let data =
                    Bytes::from((0..len).map(|j| (j as u8).wrapping_mul(13) ^ seed).collect::<Vec<u8>>());
                b.write(offset, data.clone(), false).await.unwrap();
                model.write(offset, data, false).await.unwrap();
            }
            Op::Trim { offset, len } => {
                let Some((offset, len)) = clip(offset, len) else { continue };
                b.trim(offset, len).await.unwrap();
                model.write_zeroes(offset, len, false, false).await.unwrap();
            }
            Op::Zero { offset, len, may_trim } => {
                let Some((offset, len)) = clip(offset, len) else { continue };
                b.write_zeroes(offset, len, may_trim, false).await.unwrap();
                model.write_zeroes(offset, len, false, false).await.unwrap();
            }
            Op::Read { offset, len } => {
                let Some((offset, len)) = clip(offset, u64::from(len)) else { continue };
                let got = b.read(offset, len as u32).await.unwrap();
                let want = model.read(offset, len as u32).await.unwrap();
                assert!(got == want, "op {i}: read {offset}+{len} differs");
            }
        }
    }
    let got = b.read(0, SIZE as u32).await.unwrap();
    let want = model.read(0, SIZE as u32).await.unwrap();
    assert!(got == want, "final contents differ");
}

async fn crypto() -> VolumeCrypto {
    let nonces = NonceSource::new(9, Arc::new(MemReserver::default()), 1000);
    VolumeCrypto { key: DataKey::generate(1).unwrap(), volume: [1; 16], nonces }
}

async fn backend(store: Arc<dyn SealedStore>, encrypted: bool) -> SealingBackend {
    if encrypted {
        SealingBackend::encrypted(store, crypto().await, Arc::new(LogReporter))
    } else {
        SealingBackend::plain(store, Arc::new(LogReporter))
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn sealed_memory_matches_the_model(ops in proptest::collection::vec(op(), 1..40), encrypted in any::<bool>()) {
        runtime().block_on(async {
            let b = backend(Arc::new(MemSealedStore::new(SIZE)), encrypted).await;
            run(&b, &ops).await;
        });
    }

    #[test]
    fn sealed_files_match_the_model(ops in proptest::collection::vec(op(), 1..30), encrypted in any::<bool>()) {
        runtime().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let engine = IoEngine::start(EngineKind::Auto, 1).unwrap();
            let store = SealedFile::create(dir.path().join("v.img"), SIZE, engine, Arc::new(LogReporter)).unwrap();
            let b = backend(Arc::new(store), encrypted).await;
            run(&b, &ops).await;
        });
    }

    #[test]
    fn any_changed_bit_of_an_encrypted_block_is_caught(bit in 0usize..(BLOCK_BYTES + 12 + 16 + 4) * 8) {
        let key = DataKey::generate(1).unwrap();
        let plain: Vec<u8> = (0..BLOCK_BYTES).map(|i| i as u8).collect();
        let mut stored = vec![0u8; BLOCK_BYTES];
        let cipher = key.encrypt_block(&[3; 16], 11, [5; 12], &plain, &mut stored).unwrap();
        let mut seal = super::Seal { crc: super::block_crc(11, &stored), cipher: Some(cipher) };
        let (byte, mask) = (bit / 8, 1u8 << (bit % 8));
        let mut c = cipher;
        match byte {
            b if b < BLOCK_BYTES => stored[b] ^= mask,
            b if b < BLOCK_BYTES + 12 => c.nonce[b - BLOCK_BYTES] ^= mask,
            b if b < BLOCK_BYTES + 28 => c.tag[b - BLOCK_BYTES - 12] ^= mask,
            b => seal.crc ^= u32::from(mask) << (8 * (b - BLOCK_BYTES - 28)),
        }
        seal.cipher = Some(c);
        let crc_ok = seal.verifies(11, &stored);
        let mut out = vec![0u8; BLOCK_BYTES];
        let decrypts = key.decrypt_block(&[3; 16], 11, &c, &stored, &mut out).is_ok();
        // A changed data bit fails both; a changed nonce or tag fails authentication;
        // a changed crc fails the checksum. Nothing passes both checks.
        prop_assert!(!(crc_ok && decrypts), "bit {bit} went unnoticed");
    }
}
