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
    assert!(
        log.stats().records_replayed > 400,
        "{} records came from the files",
        log.stats().records_replayed
    );
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

#[tokio::test]
async fn any_size_and_empty_fields_round_trip_from_memory_and_files() {
    let dir = tempfile::tempdir().unwrap();
    // Small segments, so the 2 MiB record gets a segment of its own, and is larger than one
    // file read of the reader (1 MiB).
    let o = options(dir.path());
    let big = vec![0xA5u8; 2 << 20];
    let mid = vec![3u8; 300 << 10];
    let cases: Vec<(&[u8], &[u8], &[u8])> = vec![
        (b"", b"", b""),
        (b"t", b"", b""),
        (b"", b"meta", b""),
        (b"", b"", b"p"),
        (b"a/b/c", b"m", &mid),
        (b"big", b"", &big),
        (b"after", b"x", b"y"),
    ];
    let (log, rec) = Log::open(o.clone()).unwrap();
    let mut ends = Vec::new();
    for (i, (topic, meta, payload)) in cases.iter().enumerate() {
        let r = Record {
            kind: i as u8,
            flags: 0xF0 | i as u8,
            received_at: -(i as i64),
            topic,
            meta,
            payload,
        };
        ends.push(log.append(r).await.unwrap());
    }
    let end = *ends.last().unwrap();
    timeout(BOUND, log.wait_durable(end))
        .await
        .unwrap()
        .unwrap();
    let verify = |got: &[Entry]| {
        assert_eq!(got.len(), cases.len());
        let mut pos = rec.checkpoint;
        for (i, (e, (topic, meta, payload))) in got.iter().zip(&cases).enumerate() {
            assert_eq!((e.pos, e.end), (pos, ends[i]), "record {i}");
            assert_eq!(
                (e.kind, e.flags, e.received_at),
                (i as u8, 0xF0 | i as u8, -(i as i64))
            );
            assert_eq!(&e.topic[..], *topic);
            assert_eq!(&e.meta[..], *meta);
            assert_eq!(&e.payload[..], *payload);
            pos = e.end;
        }
    };
    verify(&read_all(&log, rec.checkpoint, end).await);
    // A batch of zero still makes progress.
    let mut r = log.reader(rec.checkpoint);
    let one = timeout(BOUND, r.next_batch(0))
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(one.len(), 1);
    assert!(
        messina_seg(dir.path()).len() >= 2,
        "the big record rolled the segment"
    );
    log.close();
    log.closed().await;
    drop(log);
    let (log, rec2) = Log::open(o).unwrap();
    assert_eq!((rec2.checkpoint, rec2.end), (rec.checkpoint, end));
    assert_eq!(rec2.replay_records, cases.len() as u64);
    verify(&read_all(&log, rec.checkpoint, end).await);
    assert_eq!(log.stats().records_replayed, cases.len() as u64);
}

#[tokio::test]
async fn garbage_after_the_data_and_a_damaged_last_record_are_torn_tails() {
    let dir = tempfile::tempdir().unwrap();
    let (log, rec) = Log::open(options(dir.path())).unwrap();
    let end = append_n(&log, 0, 30).await;
    log.close();
    log.closed().await;
    drop(log);
    let seg = messina_seg(dir.path()).pop().unwrap();
    let mut f = std::fs::OpenOptions::new().append(true).open(&seg).unwrap();
    std::io::Write::write_all(&mut f, b"\x17\x00\x00\x00garbage that is not a record").unwrap();
    drop(f);
    let (log, rec2) = Log::open(options(dir.path())).unwrap();
    assert_eq!(rec2.truncated_bytes, 32);
    assert_eq!(rec2.end, end);
    check(&read_all(&log, rec.checkpoint, end).await, 0);
    log.close();
    log.closed().await;
    drop(log);

    // One flipped byte in the last record of the last segment: that record is cut off.
    let mut bytes = std::fs::read(&seg).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0x01;
    std::fs::write(&seg, &bytes).unwrap();
    let (log, rec3) = Log::open(options(dir.path())).unwrap();
    assert!(rec3.truncated_bytes > 0);
    assert_eq!(rec3.corrupt_bytes, 0);
    let got = read_all(&log, rec.checkpoint, rec3.end).await;
    assert_eq!(got.len(), 29);
    check(&got, 0);
    assert_eq!(got.last().unwrap().end, rec3.end);
    // Appending continues where the valid data ends, and survives another restart.
    let end2 = append_n(&log, 29, 3).await;
    log.close();
    log.closed().await;
    drop(log);
    let (log, rec4) = Log::open(options(dir.path())).unwrap();
    assert_eq!((rec4.end, rec4.truncated_bytes), (end2, 0));
    check(&read_all(&log, rec.checkpoint, end2).await, 0);
}

#[tokio::test]
async fn closing_persists_the_checkpoint_and_deletes_stored_segments() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = options(dir.path());
    o.segment_bytes = 4096;
    let (log, rec) = Log::open(o.clone()).unwrap();
    let end = append_n(&log, 0, 300).await;
    let all = read_all(&log, rec.checkpoint, end).await;
    let before = messina_seg(dir.path()).len();
    log.checkpoint(all[249].end).unwrap();
    // A lower checkpoint afterwards is ignored.
    log.checkpoint(all[10].end).unwrap();
    assert_eq!(log.checkpointed(), all[249].end);
    assert_eq!(log.used_bytes(), end - all[249].end);
    log.close();
    log.closed().await;
    assert!(messina_seg(dir.path()).len() < before / 2);
    drop(log);
    let (log, rec2) = Log::open(o).unwrap();
    assert_eq!((rec2.checkpoint, rec2.replay_records), (all[249].end, 50));
    check(&read_all(&log, rec2.checkpoint, end).await, 250);
}

#[tokio::test]
async fn a_log_that_lost_data_below_its_checkpoint_continues_at_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let (log, rec) = Log::open(options(dir.path())).unwrap();
    let end = append_n(&log, 0, 20).await;
    log.checkpoint(end).unwrap();
    log.close();
    log.closed().await;
    drop(log);
    // What OsBuffer mode can leave after a power loss: the checkpoint survived, the data not.
    for seg in messina_seg(dir.path()) {
        std::fs::OpenOptions::new()
            .write(true)
            .open(seg)
            .unwrap()
            .set_len(0)
            .unwrap();
    }
    let (log, rec2) = Log::open(options(dir.path())).unwrap();
    assert!(end > rec.checkpoint);
    assert_eq!((rec2.checkpoint, rec2.end), (end, end));
    let p = payload(0);
    let next = log.append(record(b"t/0", &p)).await.unwrap();
    timeout(BOUND, log.wait_durable(next))
        .await
        .unwrap()
        .unwrap();
    let got = read_all(&log, end, next).await;
    assert_eq!(
        (got.len(), got[0].pos),
        (1, end),
        "positions are never reused"
    );
}

#[tokio::test]
async fn a_short_sealed_segment_and_a_damaged_checkpoint_still_open() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = options(dir.path());
    o.segment_bytes = 4096;
    let (log, rec) = Log::open(o.clone()).unwrap();
    let end = append_n(&log, 0, 200).await;
    let all = read_all(&log, rec.checkpoint, end).await;
    log.checkpoint(all[4].end).unwrap();
    log.close();
    log.closed().await;
    drop(log);
    // A sealed segment lost its last 10 bytes, and the checkpoint file is garbage.
    let segs = messina_seg(dir.path());
    let len = std::fs::metadata(&segs[1]).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&segs[1])
        .unwrap()
        .set_len(len - 10)
        .unwrap();
    std::fs::write(dir.path().join("checkpoint"), b"not a checkpoint").unwrap();
    let (log, rec2) = Log::open(o).unwrap();
    assert_eq!(
        rec2.checkpoint, rec.checkpoint,
        "replay from the oldest segment"
    );
    assert_eq!(rec2.end, end);
    assert!(rec2.corrupt_bytes >= 10, "{}", rec2.corrupt_bytes);
    assert_eq!(rec2.truncated_bytes, 0);
    let got = read_all(&log, rec2.checkpoint, end).await;
    assert!(got.len() < 200 && got.len() > 150, "{} records", got.len());
    assert_eq!(got.last().unwrap().end, end);
    assert_eq!(got.len() as u64, rec2.replay_records);
}
