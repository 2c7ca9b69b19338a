//! Loading sessions at start: the JSON Lines session file (one `Session` per line, the field
//! names of `session.rs`). Kept to one function so the session table's own loader can replace
//! it.
#![forbid(unsafe_code)]

use std::io::BufRead;
use std::path::{Path, PathBuf};

use crate::session::Session;
use crate::store::SessionStore;

/// A session file that cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SessionFileError {
    #[error("cannot read session file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: not a session: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{path}:{line}: a session with one of these unique keys is already loaded")]
    Duplicate { path: PathBuf, line: usize },
}

/// Reads `path` (JSON Lines; blank lines are skipped) into `store`; returns how many sessions
/// it added. Errors name the line.
pub fn load_sessions_file(
    path: &Path,
    store: &dyn SessionStore,
) -> Result<usize, SessionFileError> {
    let read_err = |source| SessionFileError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let mut count = 0;
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(read_err)?;
        if line.trim().is_empty() {
            continue;
        }
        let session: Session =
            serde_json::from_str(&line).map_err(|e| SessionFileError::Parse {
                path: path.to_path_buf(),
                line: i + 1,
                message: e.to_string(),
            })?;
        if !store.insert(session) {
            return Err(SessionFileError::Duplicate {
                path: path.to_path_buf(),
                line: i + 1,
            });
        }
        count += 1;
    }
    Ok(count)
}
