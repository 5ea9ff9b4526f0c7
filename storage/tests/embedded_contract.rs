//! Runs the storage contract suite against the embedded (fjall) backend.

use std::sync::Arc;

use async_trait::async_trait;
use messina_storage::contract::Harness;
use messina_storage::embedded::{EmbeddedOptions, EmbeddedStorage};
use messina_storage::Storage;

struct Embedded {
    dir: tempfile::TempDir,
}

#[async_trait]
impl Harness for Embedded {
    async fn open(&self) -> Arc<dyn Storage> {
        Arc::new(EmbeddedStorage::open(&EmbeddedOptions::new(self.dir.path())).expect("open"))
    }
}

async fn embedded() -> Embedded {
    Embedded {
        dir: tempfile::tempdir().unwrap(),
    }
}

messina_storage::contract_suite!(embedded());
