//! Opening a volume on this node: its copy (if the record places one here) sealed and, in a
//! cluster, its replica in the volume's Raft group; or only the forwarding to the leader.

use super::*;

impl VolumeManager {
    /// Opens (or, with `create`, first creates) what serves `record` on this node.
    pub(super) async fn open_volume(&self, record: VolumeRecord, create: bool) -> Result<(), VolumeError> {
        self.open_volume_with(record, create, Arc::new(AtomicUsize::new(0))).await
    }

    pub(super) async fn open_volume_with(
        &self,
        mut record: VolumeRecord,
        create: bool,
        connections: Arc<AtomicUsize>,
    ) -> Result<(), VolumeError> {
        let name = record.name.clone();
        let path = self.data_path(&record.uuid);
        let applied_path = self.applied_path(&record.uuid);
        let rebuild_path = self.rebuild_path(&record.uuid);
        let integrity = self.metrics.integrity(&name);
        let me = self.node_id();
        let file = if self.holds_copy(&record) {
            let fresh = create || (self.replication.is_some() && !path.exists());
            if fresh && self.replication.is_some() {
                // A new or lost copy holds nothing: it must replay the whole log (or get a
                // snapshot), whatever an old applied index says.
                if !create {
                    tracing::warn!(volume = %name, "local copy is missing; rebuilding it from the replicated log");
                }
                let _ = std::fs::remove_file(&applied_path);
                let _ = std::fs::remove_file(&rebuild_path);
                let _ = std::fs::remove_file(raftblk_blockdev::store::sealed::meta_path(&path));
            }
            let reporter = integrity.clone() as Arc<dyn raftblk_blockdev::seal::IntegrityReporter>;
            let file = if fresh {
                SealedFile::create(&path, record.size_bytes, self.engine.clone(), reporter)
            } else {
                SealedFile::open(&path, self.engine.clone(), reporter).await
            }
            .map_err(|e| store_err(&name, format!("{}: {e}", path.display())))?;
            let file = match me {
                Some(id) => file.with_copy_id(id),
                None => file,
            };
            // In a cluster the copy is a cache of the replicated WAL, flushed at checkpoints:
            // the page cache takes its small writes (see FileBackend::cache_below).
            let file =
                if self.replication.is_some() { file.cache_below(COPY_CACHED_BELOW_BYTES) } else { file };
            let file_size = SealedStore::size_bytes(&file);
            if file_size < record.size_bytes {
                // A grow's truncate did not reach the disk before a crash; redo it.
                file.grow_to(record.size_bytes).map_err(|e| store_err(&name, e))?;
            } else if file_size > record.size_bytes && self.replication.is_none() {
                // The grow reached the file but not the catalog; the larger size was never
                // acknowledged, but keeping it loses nothing.
                record.size_bytes = file_size;
                self.catalog.update(&record).await?;
            }
            Some(Arc::new(file))
        } else {
            None
        };
        let size = Arc::new(AtomicU64::new(record.size_bytes));
        let (sealed, replicated): (Arc<dyn SealedStore>, _) = match (&self.replication, &file) {
            (None, Some(f)) => (f.clone(), None),
            (None, None) => return Err(store_err(&name, "no local copy on a node without peers")),
            (Some(node), local) => {
                let group = GroupId(record.group_id);
                if let Some(f) = local {
                    let (grow_file, grow_size) = (f.clone(), size.clone());
                    let store = ReplicaStore {
                        backend: f.clone(),
                        reporter: integrity.clone(),
                        grow: Arc::new(move |new_size| {
                            CopyStore::grow(grow_file.as_ref(), new_size)?;
                            grow_size.fetch_max(new_size, Ordering::SeqCst);
                            Ok(())
                        }),
                        applied_path,
                        rebuild_path,
                    };
                    let initial = if record.initial_voters.is_empty() {
                        &record.voters
                    } else {
                        &record.initial_voters
                    };
                    node.open_group(group, initial.clone(), store)
                        .await
                        .map_err(|e| store_err(&name, format!("starting its replica: {e}")))?;
                }
                let local: Option<Arc<dyn CopyStore>> = local.clone().map(|f| f as Arc<dyn CopyStore>);
                let r = Arc::new(ReplicatedStore::new(
                    node.clone(),
                    group,
                    record.voters.clone(),
                    size.clone(),
                    local,
                ));
                (r.clone(), Some(r))
            }
        };
        // Encrypted volumes are sealed and opened on the node a client talks to; the copies
        // below only ever see ciphertext.
        let mut lockable = None;
        let sealed_store = sealed.clone();
        let inner: Arc<dyn BlockBackend> = if record.encrypted {
            let id = volume_id(&record.uuid);
            match self.keys.unwrap(&name, &id, &record.wrapped_keys) {
                Ok(key) => Arc::new(SealingBackend::encrypted(
                    sealed,
                    VolumeCrypto { key, volume: id, nonces: self.nonces.clone() },
                    integrity.clone(),
                )),
                Err(e) => {
                    tracing::warn!(volume = %name, error = %e, "encrypted volume is locked on this node");
                    let l = Arc::new(Lockable {
                        why: e.to_string(),
                        size: size.clone(),
                        unlocked: OnceLock::new(),
                    });
                    lockable = Some(l.clone());
                    l
                }
            }
        } else {
            Arc::new(SealingBackend::plain(sealed, integrity.clone()))
        };
        let served = Arc::new(MeteredBackend::new(inner, self.metrics.volume(&name)));
        self.metrics.volume_size.with_label_values(&[&name]).set(record.size_bytes as i64);
        self.metrics
            .volume_connections
            .with_label_values(&[&name])
            .set(connections.load(Ordering::SeqCst) as i64);
        let volume = Volume {
            record: Mutex::new(record),
            file,
            replicated,
            lockable,
            sealed: sealed_store,
            size,
            served,
            connections,
        };
        let mut open = lock(&self.open);
        open.insert(name, Arc::new(volume));
        self.metrics.volumes.set(open.len() as i64);
        Ok(())
    }
}
