//! The ingest log against real files in temporary directories: round trips, restarts, segment
//! rolls and deletion, torn and corrupt data, backpressure, lagging readers, group commit, close.

use std::time::Duration;

use messina_log::{Durability, Entry, Log, LogError, Options, Record};
use tokio::time::timeout;

const BOUND: Duration = Duration::from_secs(20);

fn options(dir: &std::path::Path) -> Options {
    Options {
        dir: dir.to_path_buf(),
        segment_bytes: 64 << 10,
        max_bytes: 64 << 20,
        max_batch_bytes: 1 << 20,
        memory_bytes: 8 << 20,
        durability: Durability::Fsync,
    }
}

fn payload(i: usize) -> Vec<u8> {
    format!("payload-{i}-{}", "x".repeat(i % 97)).into_bytes()
}

fn record<'a>(topic: &'a [u8], payload: &'a [u8]) -> Record<'a> {
    Record {
        kind: 1,
        flags: 2,
        received_at: 1_700_000_000_000,
        topic,
        meta: b"m",
        payload,
    }
}

async fn append_n(log: &Log, from: usize, n: usize) -> u64 {
    let mut end = 0;
    for i in from..from + n {
        let p = payload(i);
        end = log
            .append(record(format!("t/{i}").as_bytes(), &p))
            .await
            .unwrap();
    }
    timeout(BOUND, log.wait_durable(end))
        .await
        .unwrap()
        .unwrap();
    end
}

async fn read_all(log: &Log, from: u64, until: u64) -> Vec<Entry> {
    let mut reader = log.reader(from);
    let mut out = Vec::new();
    while reader.position() < until {
        let batch = timeout(BOUND, reader.next_batch(100))
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        out.extend(batch);
    }
    out
}

fn check(entries: &[Entry], first: usize) {
    for (k, e) in entries.iter().enumerate() {
        let i = first + k;
        assert_eq!(&e.topic[..], format!("t/{i}").as_bytes());
        assert_eq!(&e.payload[..], &payload(i)[..], "record {i}");
        assert_eq!((e.kind, e.flags, &e.meta[..]), (1, 2, &b"m"[..]));
        if k > 0 {
            assert_eq!(entries[k - 1].end, e.pos, "positions are continuous");
        }
    }
}

#[tokio::test]
async fn round_trip_restart_and_continue() {
    let dir = tempfile::tempdir().unwrap();
    let (log, rec) = Log::open(options(dir.path())).unwrap();
    assert_eq!(rec.checkpoint, rec.end);
    let start = rec.end;
    let end = append_n(&log, 0, 300).await;
    let all = read_all(&log, start, end).await;
    assert_eq!(all.len(), 300);
    check(&all, 0);
    log.checkpoint(all[99].end).unwrap();
    log.close();
    timeout(BOUND, log.closed()).await.unwrap();
    assert!(matches!(
        log.try_append(record(b"t", b"p")),
        Err(LogError::Closed)
    ));
    drop(log);

    let (log, rec) = Log::open(options(dir.path())).unwrap();
    assert_eq!((rec.checkpoint, rec.end), (all[99].end, end));
    assert_eq!(rec.replay_records, 200);
    let rest = read_all(&log, rec.checkpoint, end).await;
    assert_eq!(rest.len(), 200);
    check(&rest, 100);
    let end2 = append_n(&log, 300, 10).await;
    let more = read_all(&log, end, end2).await;
    check(&more, 300);
}

#[tokio::test]
async fn segments_roll_and_stored_ones_are_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = options(dir.path());
    o.segment_bytes = 4096;
    let (log, rec) = Log::open(o.clone()).unwrap();
    let end = append_n(&log, 0, 1000).await;
    let segs = || {
        std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".seg")
            })
            .count()
    };
    let before = segs();
    assert!(before > 10, "{before} segments");
    let all = read_all(&log, rec.checkpoint, end).await;
    log.checkpoint(all[700].end).unwrap();
    log.persist_checkpoint().unwrap();
    assert!(
        segs() < before / 2,
        "stored segments deleted: {} of {before}",
        segs()
    );
    log.close();
    log.closed().await;
    drop(log);
    let (log, rec) = Log::open(o).unwrap();
    let rest = read_all(&log, rec.checkpoint, end).await;
    assert_eq!(rest.len(), 299);
    check(&rest, 701);
}

#[tokio::test]
async fn a_torn_tail_is_truncated_and_the_log_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let (log, rec) = Log::open(options(dir.path())).unwrap();
    let end = append_n(&log, 0, 50).await;
    log.close();
    log.closed().await;
    drop(log);
    let seg = messina_seg(dir.path()).pop().unwrap();
    let len = std::fs::metadata(&seg).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
    f.set_len(len - 5).unwrap();
    let (log, rec2) = Log::open(options(dir.path())).unwrap();
    assert!(rec2.truncated_bytes > 0);
    assert!(rec2.end < end);
    let got = read_all(&log, rec.checkpoint, rec2.end).await;
    assert_eq!(got.len(), 49);
    check(&got, 0);
    let end2 = append_n(&log, 49, 5).await;
    log.close();
    log.closed().await;
    drop(log);
    // Zeros after the data (preallocation) read as the end, not as damage.
    let seg = messina_seg(dir.path()).pop().unwrap();
    let mut f = std::fs::OpenOptions::new().append(true).open(&seg).unwrap();
    std::io::Write::write_all(&mut f, &[0u8; 100]).unwrap();
    let (log, rec3) = Log::open(options(dir.path())).unwrap();
    assert_eq!(rec3.end, end2);
    let got = read_all(&log, rec.checkpoint, end2).await;
    assert_eq!(got.len(), 54);
    check(&got, 0);
}

fn messina_seg(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn a_flipped_byte_in_a_sealed_segment_is_counted_and_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = options(dir.path());
    o.segment_bytes = 4096;
    let (log, rec) = Log::open(o.clone()).unwrap();
    let end = append_n(&log, 0, 400).await;
    log.close();
    log.closed().await;
    drop(log);
    let segs = messina_seg(dir.path());
    assert!(segs.len() > 3);
    let mut bytes = std::fs::read(&segs[1]).unwrap();
    bytes[100] ^= 0x10;
    std::fs::write(&segs[1], &bytes).unwrap();
    let (log, rec2) = Log::open(o).unwrap();
    assert!(rec2.corrupt_bytes > 0);
    assert_eq!(rec2.end, end, "later segments are intact");
    let got = read_all(&log, rec.checkpoint, end).await;
    assert!(got.len() < 400 && got.len() > 300, "{} records", got.len());
    assert_eq!(got.last().unwrap().end, end);
}

#[tokio::test]
async fn a_full_log_makes_appenders_wait_until_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = options(dir.path());
    o.max_bytes = 2000;
    let (log, rec) = Log::open(o).unwrap();
    let big = vec![7u8; 400];
    let mut ends = Vec::new();
    loop {
        match log.try_append(record(b"t", &big)) {
            Ok(end) => ends.push(end),
            Err(LogError::Full) => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(!ends.is_empty());
    let waiting = {
        let log = log.clone();
        let big = big.clone();
        tokio::spawn(async move { log.append(record(b"t", &big)).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        !waiting.is_finished(),
        "the append waits while the log is full"
    );
    timeout(BOUND, log.wait_durable(*ends.last().unwrap()))
        .await
        .unwrap()
        .unwrap();
    log.checkpoint(ends[1]).unwrap();
    timeout(BOUND, waiting).await.unwrap().unwrap().unwrap();
    assert!(log.used_bytes() <= 2000);
    let _ = rec;
    // Closing wakes an appender that is still waiting, with Closed.
    let waiting = {
        let log = log.clone();
        tokio::spawn(async move {
            loop {
                log.append(record(b"t", &[1u8; 400])).await?;
            }
            #[allow(unreachable_code)]
            Ok::<(), LogError>(())
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    log.close();
    assert!(matches!(
        timeout(BOUND, waiting).await.unwrap().unwrap(),
        Err(LogError::Closed)
    ));
}

#[tokio::test]
async fn a_lagging_reader_reads_the_files() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = options(dir.path());
    o.memory_bytes = 512;
    o.segment_bytes = 8192;
    let (log, rec) = Log::open(o).unwrap();
    let end = append_n(&log, 0, 500).await;
    let got = read_all(&log, rec.checkpoint, end).await;
    assert_eq!(got.len(), 500);
    check(&got, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appenders_are_group_committed() {
    let dir = tempfile::tempdir().unwrap();
    let (log, rec) = Log::open(options(dir.path())).unwrap();
    let mut tasks = Vec::new();
    for t in 0..8 {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            let mut ends = Vec::new();
            for i in 0..2000 {
                ends.push(
                    log.append(record(format!("{t}").as_bytes(), format!("{i}").as_bytes()))
                        .await
                        .unwrap(),
                );
            }
            for e in &ends {
                log.wait_durable(*e).await.unwrap();
            }
        }));
    }
    let reader_log = log.clone();
    let reader = tokio::spawn(async move {
        let mut r = reader_log.reader(rec.checkpoint);
        let mut seen = vec![Vec::new(); 8];
        let mut n = 0;
        while n < 16_000 {
            for e in r.next_batch(1000).await.unwrap().unwrap() {
                let t: usize = std::str::from_utf8(&e.topic).unwrap().parse().unwrap();
                seen[t].push(
                    std::str::from_utf8(&e.payload)
                        .unwrap()
                        .parse::<usize>()
                        .unwrap(),
                );
                n += 1;
            }
        }
        seen
    });
    for t in tasks {
        timeout(BOUND, t).await.unwrap().unwrap();
    }
    let seen = timeout(BOUND, reader).await.unwrap().unwrap();
    for s in seen {
        assert_eq!(
            s,
            (0..2000).collect::<Vec<_>>(),
            "every record once, in order"
        );
    }
    let stats = log.stats();
    assert_eq!(stats.records_appended, 16_000);
    assert!(
        stats.syncs < 16_000 / 4,
        "{} syncs for 16000 records",
        stats.syncs
    );
}

#[tokio::test]
async fn a_closed_log_is_read_to_its_end_and_os_buffer_works() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = options(dir.path());
    o.durability = Durability::OsBuffer;
    let (log, rec) = Log::open(o).unwrap();
    for i in 0..20 {
        let p = payload(i);
        log.append(record(format!("t/{i}").as_bytes(), &p))
            .await
            .unwrap();
    }
    log.close();
    let mut r = log.reader(rec.checkpoint);
    let mut got = Vec::new();
    while let Some(batch) = timeout(BOUND, r.next_batch(7)).await.unwrap().unwrap() {
        assert!(batch.len() <= 7);
        got.extend(batch);
    }
    assert_eq!(got.len(), 20);
    check(&got, 0);
    assert!(matches!(
        log.append(record(b"t", b"p")).await,
        Err(LogError::Closed)
    ));
}
