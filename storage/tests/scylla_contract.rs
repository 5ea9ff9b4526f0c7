//! Runs the storage contract suite against a real ScyllaDB or Apache Cassandra node, each test in a
//! fresh keyspace. `scripts/cassandra start` starts a local node (scripts/test does); the node is
//! `$MESSINA_SCYLLA_NODES` (default 127.0.0.1:9042). Only `MESSINA_SKIP_SCYLLA_TESTS=1` skips these
//! tests; an unreachable node fails them.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use messina_storage::contract::Harness;
use messina_storage::scylla::{test_node, ScyllaOptions, ScyllaStorage};
use messina_storage::Storage;
use scylla::client::session_builder::SessionBuilder;
use tokio::sync::{OnceCell, Semaphore};

struct Scylla {
    options: ScyllaOptions,
}

#[async_trait]
impl Harness for Scylla {
    async fn open(&self) -> Arc<dyn Storage> {
        // Schema changes are serialised: concurrent DDL on one node only slows schema agreement.
        static DDL: Semaphore = Semaphore::const_new(1);
        let _turn = DDL.acquire().await.unwrap();
        Arc::new(
            ScyllaStorage::connect(&self.options)
                .await
                .expect("connect to the test keyspace"),
        )
    }
}

/// Checks the node answers, once per test binary, and drops keyspaces left by earlier runs.
async fn prepare_node() {
    static READY: OnceCell<()> = OnceCell::const_new();
    READY
        .get_or_init(|| async {
            let session = SessionBuilder::new()
                .known_nodes(test_node::nodes())
                .build()
                .await
                .unwrap_or_else(|e| panic!("{}", test_node::unreachable(e)));
            let ours = format!("messina_test_{}_", std::process::id());
            let rows = session
                .query_unpaged("SELECT keyspace_name FROM system_schema.keyspaces", ())
                .await
                .expect("list keyspaces")
                .into_rows_result()
                .expect("rows");
            for row in rows.rows::<(String,)>().expect("keyspace names") {
                let (name,) = row.expect("keyspace name");
                if name.starts_with("messina_test_") && !name.starts_with(&ours) {
                    let _ = session
                        .query_unpaged(format!("DROP KEYSPACE IF EXISTS {name}"), ())
                        .await;
                }
            }
        })
        .await;
}

async fn scylla() -> Scylla {
    prepare_node().await;
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let keyspace = format!(
        "messina_test_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let mut options = ScyllaOptions::local(&keyspace);
    options.nodes = test_node::nodes();
    Scylla { options }
}

messina_storage::contract_suite!(
    scylla(),
    #[cfg_attr(messina_skip_scylla, ignore = "MESSINA_SKIP_SCYLLA_TESTS=1")]
);
