//! The durable event spool: events the app publishes are appended here (fsync) before the
//! sidecar answers 202, then forwarded to the event bus in order.
//!
//! Layout: `<data-dir>/spool/seg-<first sequence>.log` segment files of records
//! `[length u32 BE][crc32 u32 BE][protobuf Event]`, and `cursor` holding the sequence number of
//! the first record not yet acknowledged by the bus (not fsync'd: behind after a crash, it only
//! re-sends events the bus then drops by id). On open, a torn or corrupt tail (a crash
//! mid-append) is detected by length and checksum and truncated; it was never acknowledged.
//! A segment whose records are all forwarded is deleted once a newer one exists.
//!
//! Appends are group-committed: whatever batches are waiting are written together and share one
//! fsync ([`Spool::append_group`]).
//!
//! Two high-water marks refuse new events (the app gets 429, nothing is dropped): pending bytes
//! over the size limit, and the oldest pending event older than the age limit (the bus has been
//! out of reach too long). Age counts from the append (from the event's own time after a
//! restart, which the spool does not record separately).

use mesh_proto::{prost::Message, v1};
use std::{
    collections::VecDeque,
    fs::{File, OpenOptions},
    io::{Read, Write},
    path::{Path, PathBuf},
};

/// Records per segment before a new one starts.
const SEGMENT_RECORDS: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("the spool is full ({bytes} bytes pending, limit {limit}): retry later")]
    Full { bytes: u64, limit: u64 },
    #[error(
        "the oldest unforwarded event has waited {age_s} s (limit {limit_s} s): the bus is out of reach; retry later"
    )]
    TooOld { age_s: u64, limit_s: u64 },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io { path: path.display().to_string(), source }
}

struct Segment {
    first: u64,
    path: PathBuf,
}

/// An append-only, checksummed, fsync'd queue of events.
pub struct Spool {
    dir: PathBuf,
    segments: VecDeque<Segment>,
    /// Sequence number of the next record appended.
    next: u64,
    /// First record not yet acknowledged by the bus.
    cursor: u64,
    /// Bytes of records not yet acknowledged.
    pending_bytes: u64,
    /// Size and append time (Unix ms) of each pending record, oldest first.
    pending_records: VecDeque<(u64, u64)>,
    limit: u64,
    max_age_ms: u64,
    /// Group commits (write + fsync) so far.
    commits: u64,
    /// The pending events from the cursor on, as appended by this process, while they are
    /// contiguous and fewer than [`MEMORY_RECORDS`]: the forwarder reads these instead of the
    /// segment files.
    recent: VecDeque<(u64, v1::Event)>,
}

/// Most pending events also kept in memory.
const MEMORY_RECORDS: usize = 8192;

fn seg_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("seg-{first:020}.log"))
}

/// Reads a segment's valid records, truncating a torn or corrupt tail in place.
fn read_segment(path: &Path) -> Result<Vec<Vec<u8>>, SpoolError> {
    let mut bytes = Vec::new();
    File::open(path).and_then(|mut f| f.read_to_end(&mut bytes)).map_err(io(path))?;
    let mut out = Vec::new();
    let mut at = 0usize;
    while at + 8 <= bytes.len() {
        let len = u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap_or_default()) as usize;
        let crc = u32::from_be_bytes(bytes[at + 4..at + 8].try_into().unwrap_or_default());
        let Some(payload) = bytes.get(at + 8..at + 8 + len) else { break };
        if crc32fast::hash(payload) != crc {
            break;
        }
        out.push(payload.to_vec());
        at += 8 + len;
    }
    if at < bytes.len() {
        tracing::warn!(segment = %path.display(), kept = at, dropped = bytes.len() - at, "spool segment has a torn or corrupt tail (a crash mid-append): truncating it");
        let f = OpenOptions::new().write(true).open(path).map_err(io(path))?;
        f.set_len(at as u64).map_err(io(path))?;
        f.sync_all().map_err(io(path))?;
    }
    Ok(out)
}

impl Spool {
    /// Opens (creating) the spool in `dir`, accepting at most `limit` pending bytes and new
    /// events only while the oldest pending one is younger than `max_age`.
    pub fn open(dir: &Path, limit: u64, max_age: std::time::Duration) -> Result<Spool, SpoolError> {
        let now = mesh_proto::unix_ms(std::time::SystemTime::now());
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let mut firsts: Vec<u64> = std::fs::read_dir(dir)
            .map_err(io(dir))?
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str()?.strip_prefix("seg-")?.strip_suffix(".log")?.parse().ok())
            .collect();
        firsts.sort_unstable();
        let cursor_path = dir.join("cursor");
        let cursor =
            std::fs::read_to_string(&cursor_path).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0);
        let mut spool = Spool {
            dir: dir.to_path_buf(),
            segments: VecDeque::new(),
            next: 0,
            cursor,
            pending_bytes: 0,
            pending_records: VecDeque::new(),
            limit,
            max_age_ms: max_age.as_millis().min(u64::MAX as u128) as u64,
            commits: 0,
            recent: VecDeque::new(),
        };
        for first in firsts {
            let path = seg_path(dir, first);
            let records = read_segment(&path)?;
            for (i, r) in records.iter().enumerate() {
                if first + i as u64 >= cursor {
                    let at = v1::Event::decode(r.as_slice()).map_or(now, |e| e.time_unix_ms.min(now));
                    spool.pending_bytes += r.len() as u64 + 8;
                    spool.pending_records.push_back((r.len() as u64 + 8, at));
                }
            }
            spool.next = first + records.len() as u64;
            spool.segments.push_back(Segment { first, path });
        }
        spool.next = spool.next.max(cursor);
        spool.cursor = spool.cursor.min(spool.next);
        Ok(spool)
    }

    pub fn pending(&self) -> u64 {
        self.next - self.cursor
    }

    pub fn pending_bytes(&self) -> u64 {
        self.pending_bytes
    }

    /// Group commits (one write and one fsync each) since the spool opened.
    pub fn commits(&self) -> u64 {
        self.commits
    }

    /// How long (ms) the oldest pending event has waited at `now_ms`; 0 when none.
    pub fn oldest_age_ms(&self, now_ms: u64) -> u64 {
        self.pending_records.front().map_or(0, |(_, at)| now_ms.saturating_sub(*at))
    }

    /// Appends `events` (at `now_ms`) and fsyncs; returns their sequence numbers. Refused whole
    /// (nothing is written) past the size limit or while the oldest pending event is too old.
    pub fn append(&mut self, events: &[v1::Event], now_ms: u64) -> Result<Vec<u64>, SpoolError> {
        self.append_group(&[events], now_ms).pop().unwrap_or_else(|| Ok(Vec::new()))
    }

    /// Group commit: appends each batch that fits the limits (each accepted or refused whole)
    /// with one write and one fsync for all of them; one result per batch, in order.
    pub fn append_group(
        &mut self,
        batches: &[&[v1::Event]],
        now_ms: u64,
    ) -> Vec<Result<Vec<u64>, SpoolError>> {
        let age = self.oldest_age_ms(now_ms);
        let mut results = Vec::with_capacity(batches.len());
        let mut buf = Vec::new();
        let (mut next, mut pending_bytes) = (self.next, self.pending_bytes);
        let mut sizes = Vec::new();
        for events in batches {
            let encoded: Vec<Vec<u8>> = events.iter().map(|e| e.encode_to_vec()).collect();
            let size: u64 = encoded.iter().map(|b| b.len() as u64 + 8).sum();
            if pending_bytes + size > self.limit {
                results.push(Err(SpoolError::Full { bytes: pending_bytes, limit: self.limit }));
                continue;
            }
            if age > self.max_age_ms {
                results.push(Err(SpoolError::TooOld { age_s: age / 1000, limit_s: self.max_age_ms / 1000 }));
                continue;
            }
            for b in &encoded {
                buf.extend_from_slice(&(b.len() as u32).to_be_bytes());
                buf.extend_from_slice(&crc32fast::hash(b).to_be_bytes());
                buf.extend_from_slice(b);
                sizes.push(b.len() as u64 + 8);
            }
            results.push(Ok((next..next + events.len() as u64).collect()));
            next += events.len() as u64;
            pending_bytes += size;
        }
        if sizes.is_empty() {
            return results;
        }
        if let Err(e) = self.write_records(&buf) {
            // Nothing counts as appended: every batch of the group hears the failure.
            return results
                .into_iter()
                .map(|r| match r {
                    Ok(_) => Err(SpoolError::Io {
                        path: self.dir.display().to_string(),
                        source: std::io::Error::other(e.to_string()),
                    }),
                    refused => refused,
                })
                .collect();
        }
        self.commits += 1;
        let mut seq = self.next;
        for (events, result) in batches.iter().zip(&results) {
            if result.is_err() {
                continue;
            }
            for e in events.iter() {
                let follows = match self.recent.back() {
                    Some((last, _)) => *last + 1 == seq,
                    None => seq == self.cursor,
                };
                if follows && self.recent.len() < MEMORY_RECORDS {
                    self.recent.push_back((seq, e.clone()));
                }
                seq += 1;
            }
        }
        self.next = next;
        self.pending_bytes = pending_bytes;
        self.pending_records.extend(sizes.into_iter().map(|s| (s, now_ms)));
        results
    }

    /// Writes encoded records to the current segment (starting a new one when it is full) and
    /// fsyncs.
    fn write_records(&mut self, buf: &[u8]) -> Result<(), SpoolError> {
        let needs_new = match self.segments.back() {
            None => true,
            Some(s) => self.next - s.first >= SEGMENT_RECORDS,
        };
        if needs_new {
            let path = seg_path(&self.dir, self.next);
            File::create(&path).map_err(io(&path))?;
            File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io(&self.dir))?;
            self.segments.push_back(Segment { first: self.next, path });
        }
        let seg = &self.segments[self.segments.len() - 1];
        let mut f = OpenOptions::new().append(true).open(&seg.path).map_err(io(&seg.path))?;
        let before = f.metadata().map_err(io(&seg.path))?.len();
        let written = f.write_all(buf).and_then(|()| f.sync_data());
        if let Err(e) = written {
            // Not acknowledged: take the records back so the file matches the sequence numbers.
            let _ = f.set_len(before).and_then(|()| f.sync_data());
            return Err(io(&seg.path)(e));
        }
        Ok(())
    }

    /// Up to `max` pending events from the cursor on, in order.
    pub fn peek(&self, max: usize) -> Result<Vec<v1::Event>, SpoolError> {
        let want = (max as u64).min(self.pending()) as usize;
        if self.recent.front().is_some_and(|(seq, _)| *seq == self.cursor) && self.recent.len() >= want {
            return Ok(self.recent.iter().take(want).map(|(_, e)| e.clone()).collect());
        }
        let mut out = Vec::new();
        for seg in &self.segments {
            let end = self.segments.iter().find(|s| s.first > seg.first).map_or(self.next, |s| s.first);
            if end <= self.cursor {
                continue;
            }
            for (i, r) in read_segment(&seg.path)?.into_iter().enumerate() {
                if seg.first + i as u64 >= self.cursor
                    && out.len() < max
                    && let Ok(e) = v1::Event::decode(r.as_slice())
                {
                    out.push(e);
                }
            }
            if out.len() >= max {
                break;
            }
        }
        Ok(out)
    }

    /// Marks `n` more events acknowledged by the bus (durably) and drops finished segments.
    pub fn ack(&mut self, n: u64) -> Result<(), SpoolError> {
        self.cursor = (self.cursor + n).min(self.next);
        while self.recent.front().is_some_and(|(seq, _)| *seq < self.cursor) {
            self.recent.pop_front();
        }
        for _ in 0..n {
            if let Some((sz, _)) = self.pending_records.pop_front() {
                self.pending_bytes -= sz;
            }
        }
        // Not fsync'd: a cursor lost in a crash only makes the forwarder send events again,
        // and the bus drops them as duplicates by id.
        let tmp = self.dir.join("cursor.tmp");
        std::fs::write(&tmp, self.cursor.to_string()).map_err(io(&tmp))?;
        std::fs::rename(&tmp, self.dir.join("cursor")).map_err(io(&tmp))?;
        while self.segments.len() > 1 && self.segments[1].first <= self.cursor {
            if let Some(old) = self.segments.pop_front() {
                let _ = std::fs::remove_file(&old.path);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: std::time::Duration = std::time::Duration::from_secs(86_400);

    fn ev(id: &str) -> v1::Event {
        v1::Event { id: id.into(), topic: "t".into(), data: vec![7; 100], ..Default::default() }
    }

    #[test]
    fn appended_events_survive_reopen_and_acks_advance_the_cursor() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 1 << 20, DAY).unwrap();
        assert_eq!(s.append(&[ev("a"), ev("b"), ev("c")], 0).unwrap(), [0, 1, 2]);
        s.ack(1).unwrap();
        drop(s);
        let mut s = Spool::open(dir.path(), 1 << 20, DAY).unwrap();
        assert_eq!(s.pending(), 2);
        let ids: Vec<String> = s.peek(10).unwrap().into_iter().map(|e| e.id).collect();
        assert_eq!(ids, ["b", "c"]);
        s.ack(2).unwrap();
        assert_eq!((s.pending(), s.pending_bytes()), (0, 0));
        assert_eq!(s.append(&[ev("d")], 0).unwrap(), [3]);
    }

    #[test]
    fn a_torn_tail_is_truncated_and_never_served() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 1 << 20, DAY).unwrap();
        s.append(&[ev("a"), ev("b")], 0).unwrap();
        drop(s);
        let seg = seg_path(dir.path(), 0);
        let len = std::fs::metadata(&seg).unwrap().len();
        // A crash mid-append: half a record, and separately a flipped byte in the last one.
        let f = OpenOptions::new().write(true).open(&seg).unwrap();
        f.set_len(len - 20).unwrap();
        let s = Spool::open(dir.path(), 1 << 20, DAY).unwrap();
        assert_eq!(s.peek(10).unwrap().into_iter().map(|e| e.id).collect::<Vec<_>>(), ["a"]);
        assert_eq!(s.pending(), 1);
        assert!(std::fs::metadata(&seg).unwrap().len() < len - 20, "the torn record is cut off");
    }

    #[test]
    fn past_the_limit_appends_are_refused_whole() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 300, DAY).unwrap();
        s.append(&[ev("a"), ev("b")], 0).unwrap();
        assert!(matches!(s.append(&[ev("c")], 0), Err(SpoolError::Full { .. })));
        assert_eq!(s.pending(), 2);
        s.ack(2).unwrap();
        assert!(s.append(&[ev("c")], 0).is_ok(), "room again once forwarded");
    }

    #[test]
    fn past_the_age_limit_appends_are_refused_until_the_old_events_drain() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 1 << 20, std::time::Duration::from_secs(60)).unwrap();
        s.append(&[ev("a")], 1_000).unwrap();
        assert!(s.append(&[ev("b")], 61_000).is_ok(), "at the limit: still accepted");
        assert_eq!(s.oldest_age_ms(61_001), 60_001);
        let refused = s.append(&[ev("c")], 61_001).unwrap_err();
        assert!(matches!(refused, SpoolError::TooOld { age_s: 60, limit_s: 60 }), "{refused}");
        assert_eq!(s.pending(), 2, "nothing dropped");
        s.ack(1).unwrap();
        assert_eq!(s.oldest_age_ms(61_001), 1);
        assert!(s.append(&[ev("c")], 61_001).is_ok(), "accepted once the oldest is forwarded");
    }

    #[test]
    fn a_group_commit_accepts_or_refuses_each_batch_whole_and_numbers_them_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 600, DAY).unwrap();
        let (one, big, two) = ([ev("a")], [ev("x"), ev("y"), ev("z"), ev("w"), ev("v")], [ev("b"), ev("c")]);
        let r = s.append_group(&[&one, &big, &two], 0);
        assert_eq!(r[0].as_ref().unwrap(), &[0]);
        assert!(matches!(r[1], Err(SpoolError::Full { .. })), "the batch over the limit is refused whole");
        assert_eq!(r[2].as_ref().unwrap(), &[1, 2]);
        drop(s);
        let s = Spool::open(dir.path(), 600, DAY).unwrap();
        let ids: Vec<String> = s.peek(10).unwrap().into_iter().map(|e| e.id).collect();
        assert_eq!(ids, ["a", "b", "c"], "what was accepted is on disk, in order");
    }
}
