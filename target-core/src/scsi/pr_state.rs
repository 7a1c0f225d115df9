//! Reservations that survive a restart: APTPL (SPC-4 §5.14.5, "Persist Through Power Loss").
//!
//! # Contract
//! - A LU backed by a regular file keeps its persistent reservation state in
//!   `<backing file>.pr` (see [`PrFile::beside`]), so the state moves and is deleted with the
//!   data. Memory and block-device LUNs have no such file: they refuse APTPL=1 (PTPL_C=0).
//! - The file is written only while APTPL is in effect (the last REGISTER or REGISTER AND
//!   IGNORE EXISTING KEY had APTPL=1), after every PERSISTENT RESERVE OUT that changed the
//!   state, before the command completes; a REGISTER with APTPL=0 deletes it. Writes are
//!   atomic: a temporary file, fsync, rename over the old one, fsync of the directory. A write
//!   that fails fails the command and leaves the state as it was.
//! - Loading happens when the LU is opened (agent start, a reload that replaces the LU). A
//!   file that does not parse, fails its checksum, or names another LU (its NAA designator,
//!   derived from the target name and LUN) is refused: the LU does not open, with an error
//!   naming the file and what is wrong. Reservations are never dropped silently.
//!
//! # Format
//! Text, one item per line, ending with a CRC32C of everything before it:
//! ```text
//! ktgt persistent reservations 1
//! lu naa.6026b743b59ff3a7a819192e6591c67c
//! generation 7
//! register 1 00000000000000ab iqn.2024-01.example:host,i,0x400001370000
//! reserve 5 1 iqn.2024-01.example:host,i,0x400001370000
//! crc32c 1a2b3c4d
//! ```

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use super::pr::{ItNexus, PrType, Reservations};

const MAGIC: &str = "ktgt persistent reservations 1";

/// Why reservation state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum PrStateError {
    #[error("reservation state {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reservation state {} is unreadable ({reason}); the LU is not served until it is repaired or removed (removing it drops its registrations)", path.display())]
    Corrupt { path: PathBuf, reason: String },
    #[error("reservation state {} belongs to LU {found}, not to this LU ({expected}): the backing file was moved to another target name or LUN; remove the state file to serve it without its registrations", path.display())]
    Foreign {
        path: PathBuf,
        found: String,
        expected: String,
    },
}

/// Where one LU keeps its reservation state.
#[derive(Debug, Clone)]
pub struct PrFile {
    path: PathBuf,
    /// `naa.<32 hex digits>`: the LU the state belongs to.
    lu: String,
}

impl PrFile {
    /// The state file of the LU backed by `backing`: `<backing>.pr`.
    pub fn beside(backing: &Path, naa: &[u8; 16]) -> PrFile {
        let mut path = backing.as_os_str().to_owned();
        path.push(".pr");
        PrFile {
            path: PathBuf::from(path),
            lu: lu_name(naa),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The saved state, `None` when there is no file.
    pub(crate) fn load(&self) -> Result<Option<Reservations>, PrStateError> {
        let text = match std::fs::read(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(PrStateError::Io {
                    path: self.path.clone(),
                    source,
                })
            }
        };
        let corrupt = |reason: String| PrStateError::Corrupt {
            path: self.path.clone(),
            reason,
        };
        let text = String::from_utf8(text).map_err(|_| corrupt("not UTF-8".into()))?;
        let body_end = text
            .rfind("crc32c ")
            .ok_or_else(|| corrupt("no checksum line (truncated?)".into()))?;
        let (body, sum) = text.split_at(body_end);
        let want = sum
            .trim_end()
            .strip_prefix("crc32c ")
            .and_then(|h| u32::from_str_radix(h, 16).ok())
            .ok_or_else(|| corrupt("bad checksum line".into()))?;
        if iscsi_proto::codec::crc32c(body.as_bytes()) != want {
            return Err(corrupt("checksum mismatch (truncated or edited)".into()));
        }
        let mut lines = body.lines();
        if lines.next() != Some(MAGIC) {
            return Err(corrupt(format!("first line is not {MAGIC:?}")));
        }
        let lu = lines
            .next()
            .and_then(|l| l.strip_prefix("lu "))
            .ok_or_else(|| corrupt("no lu line".into()))?;
        if lu != self.lu {
            return Err(PrStateError::Foreign {
                path: self.path.clone(),
                found: lu.to_owned(),
                expected: self.lu.clone(),
            });
        }
        let mut generation = None;
        let mut registrations = Vec::new();
        let mut reservation = None;
        for (n, line) in lines.enumerate() {
            let at = |what: &str| corrupt(format!("line {}: {what}", n + 3));
            let mut f = line.split(' ');
            match f.next() {
                Some("generation") => {
                    generation = Some(
                        f.next()
                            .and_then(|v| v.parse::<u32>().ok())
                            .ok_or_else(|| at("bad generation"))?,
                    )
                }
                Some("register") => {
                    let (port, key, initiator) = (f.next(), f.next(), f.next());
                    let port = port.and_then(|p| p.parse::<u16>().ok());
                    let key = key.and_then(|k| u64::from_str_radix(k, 16).ok());
                    match (port, key, initiator) {
                        (Some(p), Some(k), Some(i)) if !i.is_empty() => {
                            registrations.push((ItNexus::new(i, p), k))
                        }
                        _ => return Err(at("bad registration")),
                    }
                }
                Some("reserve") => {
                    let kind = f
                        .next()
                        .and_then(|t| t.parse::<u8>().ok())
                        .and_then(PrType::from_code);
                    let port = f.next().and_then(|p| p.parse::<u16>().ok());
                    match (kind, port, f.next()) {
                        (Some(k), Some(p), Some(i)) if !i.is_empty() => {
                            reservation = Some((k, ItNexus::new(i, p)))
                        }
                        _ => return Err(at("bad reservation")),
                    }
                }
                _ => return Err(at("unknown item")),
            }
            if f.next().is_some() {
                return Err(at("trailing fields"));
            }
        }
        let generation = generation.ok_or_else(|| corrupt("no generation line".into()))?;
        Reservations::restore(generation, registrations, reservation)
            .map(Some)
            .map_err(|reason| corrupt(reason.to_owned()))
    }

    /// Writes `res` atomically (see the module docs).
    pub(crate) fn save(&self, res: &Reservations) -> Result<(), PrStateError> {
        let mut body = format!("{MAGIC}\nlu {}\ngeneration {}\n", self.lu, res.generation());
        for (port, key) in res.registered() {
            let _ = writeln!(
                body,
                "register {} {key:016x} {}",
                port.target_port,
                port.initiator()
            );
        }
        if let Some((kind, holder)) = res.reservation() {
            let _ = writeln!(
                body,
                "reserve {} {} {}",
                kind.code(),
                holder.target_port,
                holder.initiator()
            );
        }
        let sum = iscsi_proto::codec::crc32c(body.as_bytes());
        let _ = writeln!(body, "crc32c {sum:08x}");
        let io = |source| PrStateError::Io {
            path: self.path.clone(),
            source,
        };
        let mut tmp = self.path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let result = (|| {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(body.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.path)?;
            sync_dir(&self.path)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result.map_err(io)
    }

    /// Deletes the state (APTPL turned off); a missing file is fine.
    pub(crate) fn remove(&self) -> Result<(), PrStateError> {
        match std::fs::remove_file(&self.path) {
            Ok(()) => sync_dir(&self.path).map_err(|source| PrStateError::Io {
                path: self.path.clone(),
                source,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(PrStateError::Io {
                path: self.path.clone(),
                source,
            }),
        }
    }
}

/// fsync of the directory holding `path`, so a rename or unlink is durable.
fn sync_dir(path: &Path) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::File::open(dir)?.sync_all()
}

fn lu_name(naa: &[u8; 16]) -> String {
    let mut s = String::from("naa.");
    for b in naa {
        let _ = write!(s, "{b:02x}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Reservations {
        let a = ItNexus::new("iqn.2024-01.test:a,i,0x400001370000", 1);
        let b = ItNexus::new("iqn.2024-01.test:b,i,0x400001370001", 2);
        Reservations::restore(
            41,
            vec![(a.clone(), 0xab), (b, 0xcd)],
            Some((PrType::WriteExclusiveRegistrantsOnly, a)),
        )
        .unwrap()
    }

    #[test]
    fn saved_state_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let file = PrFile::beside(&dir.path().join("lun.img"), &[7; 16]);
        assert!(file.load().unwrap().is_none(), "no file: no state");
        let res = sample();
        file.save(&res).unwrap();
        assert_eq!(file.path(), dir.path().join("lun.img.pr"));
        let back = file.load().unwrap().unwrap();
        assert_eq!(back.generation(), 41);
        let regs: Vec<(String, u16, u64)> = back
            .registered()
            .map(|(p, k)| (p.initiator().to_owned(), p.target_port, k))
            .collect();
        assert_eq!(
            regs,
            [
                ("iqn.2024-01.test:a,i,0x400001370000".to_owned(), 1, 0xab),
                ("iqn.2024-01.test:b,i,0x400001370001".to_owned(), 2, 0xcd)
            ]
        );
        let (kind, holder) = back.reservation().unwrap();
        assert_eq!(kind, PrType::WriteExclusiveRegistrantsOnly);
        assert_eq!(holder.target_port, 1);
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        file.remove().unwrap();
        file.remove().unwrap();
        assert!(file.load().unwrap().is_none());
    }

    #[test]
    fn truncated_edited_and_foreign_state_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let backing = dir.path().join("lun.img");
        let file = PrFile::beside(&backing, &[7; 16]);
        file.save(&sample()).unwrap();
        let text = std::fs::read_to_string(file.path()).unwrap();

        std::fs::write(file.path(), &text[..text.len() / 2]).unwrap();
        let e = file.load().unwrap_err().to_string();
        assert!(
            e.contains("lun.img.pr is unreadable") && e.contains("truncated"),
            "{e}"
        );

        std::fs::write(
            file.path(),
            text.replace("register 1 00000000000000ab", "register 1 00000000000000ac"),
        )
        .unwrap();
        let e = file.load().unwrap_err().to_string();
        assert!(e.contains("checksum mismatch"), "{e}");

        std::fs::write(file.path(), &text).unwrap();
        let other = PrFile::beside(&backing, &[8; 16]);
        let e = other.load().unwrap_err().to_string();
        assert!(
            e.contains("belongs to LU naa.0707") && e.contains("not to this LU (naa.0808"),
            "{e}"
        );
    }
}
