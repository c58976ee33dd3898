//! The manifests source: Services, EndpointSlices and Nodes read from Kubernetes YAML (or JSON)
//! files in a directory, for running without a cluster (the lab, tests, a standalone node load
//! balancer). It feeds the same [`SourceEvent`]s as the Kubernetes watchers.
//!
//! [`load_dir`] reads every `*.yaml`, `*.yml` and `*.json` file directly in the directory (not in
//! subdirectories; names starting with `.` are skipped, which also skips the `..data` machinery of
//! a mounted ConfigMap while following its symlinked files), in file-name order. Files hold one or
//! more documents separated by `---` lines; each document is a `v1` Service, a
//! `discovery.k8s.io/v1` EndpointSlice, a `v1` Node, or a `List` (`kind: List`, or `ServiceList`
//! and the like as the API returns them) of those. Other kinds are ignored with a log line. A
//! document that does not parse is reported as a [`Problem`] and skipped; the rest of the file
//! still loads. Namespaced objects without a namespace go to `default`, as with `kubectl apply`.
//! When the same object appears twice, the later one (by file name, then position) wins and the
//! duplicate is reported.
//!
//! [`run`] sends a Snapshot of each of the three kinds at start (empty ones too: that is how the
//! pipeline learns this source is synced), then polls the directory and sends all three again
//! whenever anything changed. Only files whose contents changed are parsed again: the objects of
//! the others come from the last parse (parsing, not the rest of the pipeline, is what a reload of
//! a large directory costs).

use std::{
    collections::BTreeMap,
    fmt, fs,
    path::{Path, PathBuf},
    time::Duration,
};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::model::{Kind, ObjKey, Resource, SourceEvent};

/// How often [`run`] looks at the directory unless told otherwise.
pub const DEFAULT_POLL: Duration = Duration::from_millis(500);
/// Polls a change may wait to be seen stable before it is loaded anyway.
pub const MAX_UNSTABLE_POLLS: u32 = 2;

/// Something in the directory that could not be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// The file (or, when the directory itself cannot be read, the directory).
    pub file: PathBuf,
    /// Which document of the file, counting from 1; `None` for the whole file.
    pub document: Option<usize>,
    /// The line of the file where that document starts (1-based; 0 for the whole file). Line
    /// numbers inside `error` are the file's too.
    pub line: usize,
    pub error: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.document {
            Some(n) => write!(
                f,
                "{}, document {n} (from line {}): {}",
                self.file.display(),
                self.line,
                self.error
            ),
            None => write!(f, "{}: {}", self.file.display(), self.error),
        }
    }
}

/// Reads every manifest file in `dir` (see the module documentation): the objects found, and what
/// could not be used. An unreadable directory is one problem and no objects.
pub fn load_dir(dir: &Path) -> (Vec<Resource>, Vec<Problem>) {
    Cache::default().load(dir, &read_files(dir))
}

/// Parses one file's text (`file` only names it in problems and logs).
pub fn parse(file: &Path, text: &str) -> (Vec<Resource>, Vec<Problem>) {
    let mut out = Combined::default();
    out.add(file, &parse_file(file, text));
    (out.resources, out.problems)
}

/// The manifest files of a directory as read: (path, a hash of the contents or the error reading
/// them); or the error listing the directory. Hashes rather than the contents: the poll loop keeps
/// the last loaded and a pending state, and a copy of every file's bytes in each cost more memory
/// than the parsed objects (and churned the allocator at every poll).
type Files = Result<Vec<(PathBuf, Result<u64, String>)>, String>;

fn content_hash(bytes: &[u8]) -> u64 {
    // SipHash with fixed keys: stable across polls; 64 bits make a missed edit (two different
    // contents with one hash) vanishingly unlikely.
    let mut h = std::hash::DefaultHasher::new();
    std::hash::Hasher::write(&mut h, bytes);
    std::hash::Hasher::finish(&h)
}

fn read_files(dir: &Path) -> Files {
    let entries = fs::read_dir(dir).map_err(|e| format!("reading the directory: {e}"))?;
    let mut paths = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| format!("reading the directory: {e}"))?;
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let manifest = !name.starts_with('.')
            && path.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                ["yaml", "yml", "json"]
                    .iter()
                    .any(|x| e.eq_ignore_ascii_case(x))
            });
        // fs::metadata follows symlinks: a symlinked file counts, a directory named x.yaml not.
        if manifest && fs::metadata(&path).is_ok_and(|m| m.is_file()) {
            paths.push(path);
        }
    }
    paths.sort();
    // One buffer for every file: only the hashes are kept.
    let mut buf = Vec::new();
    Ok(paths
        .into_iter()
        .map(|p| {
            buf.clear();
            let hash = fs::File::open(&p)
                .and_then(|mut f| std::io::Read::read_to_end(&mut f, &mut buf))
                .map(|_| content_hash(&buf))
                .map_err(|e| format!("reading: {e}"));
            (p, hash)
        })
        .collect())
}

/// What one file held, in order: objects (with the document they came from) and problems of its
/// own. Duplicates across documents and files are found when the files are combined.
type Parsed = Vec<Entry>;

// Most entries are objects; boxing them would add an allocation to each.
#[allow(clippy::large_enum_variant)]
enum Entry {
    Object {
        document: usize,
        line: usize,
        resource: Resource,
    },
    Problem(Problem),
}

/// Each file's contents (hash) as last parsed, and what the parse found: a reload parses only the
/// files whose contents differ.
#[derive(Default)]
struct Cache {
    files: BTreeMap<PathBuf, (u64, Parsed)>,
    /// Files parsed so far (the others were reused).
    parsed_files: usize,
}

impl Cache {
    /// The objects and problems of `files` (read from `dir`), parsing only what changed since the
    /// last call (read again for that: a file changed since `files` were read is parsed as it is
    /// now, cached under its new hash, and seen changed at the next poll); forgets files no longer
    /// there.
    fn load(&mut self, dir: &Path, files: &Files) -> (Vec<Resource>, Vec<Problem>) {
        let mut out = Combined::default();
        let files = match files {
            Ok(files) => files,
            Err(error) => {
                self.files.clear();
                out.problems.push(Problem {
                    file: dir.to_owned(),
                    document: None,
                    line: 0,
                    error: error.clone(),
                });
                return (out.resources, out.problems);
            }
        };
        let mut previous = std::mem::take(&mut self.files);
        for (path, hash) in files {
            let hash = match hash {
                Ok(hash) => *hash,
                Err(error) => {
                    out.problems.push(whole_file(path, error.clone()));
                    continue;
                }
            };
            let (hash, parsed) = match previous.remove(path) {
                Some((old, parsed)) if old == hash => (hash, parsed),
                _ => {
                    let bytes = match fs::read(path) {
                        Ok(bytes) => bytes,
                        Err(e) => {
                            out.problems.push(whole_file(path, format!("reading: {e}")));
                            continue;
                        }
                    };
                    self.parsed_files += 1;
                    let parsed = match std::str::from_utf8(&bytes) {
                        Ok(text) => parse_file(path, text),
                        Err(e) => vec![Entry::Problem(whole_file(path, format!("not UTF-8: {e}")))],
                    };
                    (content_hash(&bytes), parsed)
                }
            };
            out.add(path, &parsed);
            self.files.insert(path.clone(), (hash, parsed));
        }
        (out.resources, out.problems)
    }
}

fn whole_file(file: &Path, error: String) -> Problem {
    Problem {
        file: file.to_owned(),
        document: None,
        line: 0,
        error,
    }
}

/// Files' objects and problems put together in file order, duplicates reported.
#[derive(Default)]
struct Combined {
    resources: Vec<Resource>,
    problems: Vec<Problem>,
    /// Where each object was found, for reporting duplicates.
    seen: BTreeMap<(Kind, ObjKey), (PathBuf, usize)>,
}

impl Combined {
    fn add(&mut self, file: &Path, parsed: &Parsed) {
        for entry in parsed {
            match entry {
                Entry::Problem(p) => self.problems.push(p.clone()),
                Entry::Object {
                    document,
                    line,
                    resource,
                } => {
                    let at = (file.to_owned(), *document);
                    if let Some((f, d)) = self.seen.insert((resource.kind(), resource.key()), at) {
                        self.problems.push(Problem {
                            file: file.to_owned(),
                            document: Some(*document),
                            line: *line,
                            error: format!(
                                "{} {} is also in {}, document {d}; this one wins",
                                resource.kind(),
                                resource.key(),
                                f.display()
                            ),
                        });
                    }
                    self.resources.push(resource.clone());
                }
            }
        }
    }
}

fn parse_file(file: &Path, text: &str) -> Parsed {
    let mut loader = Loader::default();
    loader.file(file, text);
    loader.entries
}

#[derive(Default)]
struct Loader {
    entries: Parsed,
    /// The first line of the document being loaded.
    line: usize,
}

impl Loader {
    fn file(&mut self, file: &Path, text: &str) {
        for (i, (line, doc)) in split_documents(text).into_iter().enumerate() {
            let document = i + 1;
            self.line = line;
            let problem = |error: String| Problem {
                file: file.to_owned(),
                document: Some(document),
                line,
                error,
            };
            match serde_yaml_ng::from_str::<Value>(doc) {
                // Empty documents (a leading or trailing `---`, only comments) are fine.
                Ok(Value::Null) => {}
                Ok(value) => {
                    if let Err(error) = self.object(file, document, value) {
                        self.entries.push(Entry::Problem(problem(error)));
                    }
                }
                Err(_) => {
                    // Parsed again behind blank lines standing in for the documents before it, so
                    // the line numbers in the error are the file's. Only on error: padding every
                    // document made a file of n documents cost O(n²) (10,000 Services in one file
                    // took seconds to parse).
                    let padded = format!("{}{doc}", "\n".repeat(line - 1));
                    let error = serde_yaml_ng::from_str::<Value>(&padded)
                        .err()
                        .map_or_else(|| "does not parse".to_owned(), |e| e.to_string());
                    self.entries.push(Entry::Problem(problem(error)));
                }
            }
        }
    }

    /// One object (or list of them) of document `document`.
    fn object(&mut self, file: &Path, document: usize, value: Value) -> Result<(), String> {
        let api_version = value.get("apiVersion").and_then(Value::as_str);
        let kind = value.get("kind").and_then(Value::as_str);
        let (Some(api_version), Some(kind)) = (api_version, kind) else {
            return Err("not a Kubernetes object: apiVersion and kind must be strings".into());
        };
        let resource = match (api_version, kind) {
            ("v1", "Service") => Resource::Service(decode::<Service>("Service", value)?),
            ("discovery.k8s.io/v1", "EndpointSlice") => {
                Resource::EndpointSlice(decode::<EndpointSlice>("EndpointSlice", value)?)
            }
            ("v1", "Node") => Resource::Node(decode::<Node>("Node", value)?),
            (_, list) if list.ends_with("List") && value.get("items").is_some() => {
                return self.list(file, document, value);
            }
            (api_version, kind) => {
                info!(
                    file = %file.display(),
                    document,
                    api_version,
                    kind,
                    "ignoring a manifest that is not a Service, EndpointSlice or Node"
                );
                return Ok(());
            }
        };
        let resource = normalize(resource)?;
        self.entries.push(Entry::Object {
            document,
            line: self.line,
            resource,
        });
        Ok(())
    }

    /// `kind: List` (items carry their own apiVersion and kind) or `ServiceList` and the like as
    /// the API returns them (items may not).
    fn list(&mut self, file: &Path, document: usize, value: Value) -> Result<(), String> {
        let api_version = value["apiVersion"].clone();
        let item_kind = value["kind"]
            .as_str()
            .and_then(|k| k.strip_suffix("List"))
            .filter(|k| !k.is_empty())
            .map(|k| Value::String(k.to_owned()));
        let Value::Array(items) = value["items"].clone() else {
            return Err("items of a List must be a sequence".into());
        };
        let mut errors = Vec::new();
        for (i, mut item) in items.into_iter().enumerate() {
            if let (Some(kind), Some(map)) = (&item_kind, item.as_object_mut()) {
                map.entry("apiVersion")
                    .or_insert_with(|| api_version.clone());
                map.entry("kind").or_insert_with(|| kind.clone());
            }
            if let Err(e) = self.object(file, document, item) {
                errors.push(format!("item {i}: {e}"));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }
}

/// Decodes one object; an error names it (kind, namespace/name as far as they can be read), so a
/// bad object in a file of many is found at once.
fn decode<K: DeserializeOwned>(kind: &str, value: Value) -> Result<K, String> {
    let name = |field: &str| {
        value
            .get("metadata")
            .and_then(|m| m.get(field))
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    };
    let object = match (name("namespace"), name("name")) {
        (_, None) => format!("{kind} without a readable metadata.name"),
        (_, Some(n)) if kind == "Node" => format!("{kind} {n}"),
        (ns, Some(n)) => format!("{kind} {}/{n}", ns.as_deref().unwrap_or("default")),
    };
    K::deserialize(&value).map_err(|e| format!("{object}: {e}"))
}

/// Checks the name, defaults the namespace of namespaced kinds to `default` and clears it on
/// Nodes.
fn normalize(mut resource: Resource) -> Result<Resource, String> {
    let kind = resource.kind();
    let meta = match &mut resource {
        Resource::Service(o) => &mut o.metadata,
        Resource::EndpointSlice(o) => &mut o.metadata,
        Resource::Node(o) => &mut o.metadata,
    };
    if meta.name.as_deref().unwrap_or_default().is_empty() {
        return Err(format!("{kind} without metadata.name"));
    }
    if kind == Kind::Node {
        meta.namespace = None;
    } else if meta.namespace.as_deref().unwrap_or_default().is_empty() {
        meta.namespace = Some("default".into());
    }
    Ok(resource)
}

/// Splits a YAML stream into its documents, each with the (1-based) line it starts on. A line
/// starting with `---` followed by nothing or a space starts a document (the marker stays in it;
/// the YAML parser accepts `--- {…}`).
///
/// serde_yaml_ng's own multi-document iterator can't be used: after a syntax error it yields the
/// same error forever instead of going on to the next document, so one bad document would hang the
/// agent. Splitting first makes every document independent.
fn split_documents(text: &str) -> Vec<(usize, &str)> {
    let mut docs = Vec::new();
    let (mut start, mut start_line) = (0, 1);
    let mut offset = 0;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let rest = line.strip_prefix("---");
        let marker = rest.is_some_and(|r| r.is_empty() || r.starts_with([' ', '\t', '\r', '\n']));
        if marker && offset > start {
            docs.push((start_line, &text[start..offset]));
            (start, start_line) = (offset, i + 1);
        } else if marker {
            start_line = i + 1;
        }
        offset += line.len();
    }
    if offset > start {
        docs.push((start_line, &text[start..]));
    }
    docs
}

/// Sends Snapshots of all three kinds from `dir`, then again whenever the directory's manifests
/// change, until `tx`'s receiver is dropped.
///
/// The directory is polled every `poll` ([`DEFAULT_POLL`]): the file list and every file's
/// contents are read and their hashes compared with the last load's; only the files that differ
/// are parsed again. Polling rather than inotify because it needs
/// no extra dependency and works the same everywhere: on ConfigMap volumes (whose files are
/// symlinks swapped atomically through `..data`, which inotify on the directory misses), bind
/// mounts, network filesystems, and a directory that does not exist yet; and comparing contents
/// rather than mtimes and sizes misses no edit, however quick. Reading even 20,000 objects' files
/// twice a second costs little next to parsing them, which happens only on a change. A change is loaded once the directory read the same on
/// two consecutive polls, so a file caught half-written is not loaded (and its objects are not
/// briefly deleted); a directory that changes at every poll (EndpointSlices rewritten faster than
/// the poll period, as under pod churn) is loaded anyway after [`MAX_UNSTABLE_POLLS`], so changes
/// are never held back for longer than that.
pub async fn run(dir: PathBuf, tx: mpsc::Sender<SourceEvent>, poll: Duration) {
    // The contents last loaded, and a changed state seen once, waiting to be seen stable.
    let mut loaded: Option<Files> = None;
    let mut pending: Option<Files> = None;
    let mut cache = Cache::default();
    // Consecutive polls that found a change not yet loaded.
    let mut unstable_polls = 0u32;
    loop {
        let d = dir.clone();
        // Only a panic (none expected) fails the blocking task; then try again next poll.
        let files = tokio::task::spawn_blocking(move || read_files(&d))
            .await
            .ok();
        let load = match (&files, &loaded) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(files), Some(last)) if last == files => {
                pending = None;
                unstable_polls = 0;
                false
            }
            (Some(files), Some(_)) if pending.as_ref() == Some(files) => true,
            (Some(_), Some(_)) if unstable_polls >= MAX_UNSTABLE_POLLS => true,
            (Some(files), Some(_)) => {
                debug!(dir = %dir.display(), "manifests changed; loading once they are stable");
                pending = Some(files.clone());
                unstable_polls += 1;
                false
            }
        };
        if let (true, Some(files)) = (load, files) {
            // Parsing is CPU work (seconds for a large directory's first load): on a blocking
            // thread, not the runtime's workers.
            let (mut c, d) = (std::mem::take(&mut cache), dir.clone());
            let Ok((c, files, (resources, problems))) = tokio::task::spawn_blocking(move || {
                let out = c.load(&d, &files);
                (c, files, out)
            })
            .await
            else {
                // Only a panic (none expected): start over with an empty cache next poll.
                loaded = None;
                tokio::time::sleep(poll).await;
                continue;
            };
            cache = c;
            for p in &problems {
                warn!(problem = %p, "manifest skipped");
            }
            let mut by_kind: BTreeMap<Kind, Vec<Resource>> =
                Kind::ALL.iter().map(|&k| (k, Vec::new())).collect();
            for r in resources {
                by_kind.entry(r.kind()).or_default().push(r);
            }
            info!(
                dir = %dir.display(),
                services = by_kind[&Kind::Service].len(),
                endpoint_slices = by_kind[&Kind::EndpointSlice].len(),
                nodes = by_kind[&Kind::Node].len(),
                problems = problems.len(),
                "manifests loaded"
            );
            for (kind, objects) in by_kind {
                if tx.send(SourceEvent::Snapshot(kind, objects)).await.is_err() {
                    return;
                }
            }
            loaded = Some(files);
            pending = None;
            unstable_polls = 0;
        }
        tokio::select! {
            () = tx.closed() => return,
            () = tokio::time::sleep(poll) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_documents_at_marker_lines_only() {
        let text = "a: 1\n---\nb: |\n  ---\n  x\n--- {c: 3}\n---\n";
        assert_eq!(
            split_documents(text),
            [
                (1, "a: 1\n"),
                (2, "---\nb: |\n  ---\n  x\n"),
                (6, "--- {c: 3}\n"),
                (7, "---\n"),
            ]
        );
        assert_eq!(split_documents("---\na: 1\n"), [(1, "---\na: 1\n")]);
        assert_eq!(split_documents(""), []);
        assert_eq!(split_documents("----\n"), [(1, "----\n")]);
    }

    fn service(name: &str, port: u16) -> String {
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{ports: [{{port: {port}}}]}}\n"
        )
    }

    /// A reload parses only the files that changed, and gives what a fresh load of the directory
    /// gives: the same objects and problems in the same order, duplicates across files included.
    #[test]
    fn reloads_parse_only_changed_files_and_match_a_fresh_load() {
        let dir = std::env::temp_dir().join(format!("manifests-cache-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, text: &str| fs::write(dir.join(name), text).unwrap();
        write("a.yaml", &(service("x", 1) + &service("y", 2)));
        write("b.yaml", &(service("y", 3) + "---\n{broken\n"));
        write("c.yaml", &service("z", 4));
        let mut cache = Cache::default();
        let check = |cache: &mut Cache, parsed: usize| {
            let before = cache.parsed_files;
            let got = cache.load(&dir, &read_files(&dir));
            assert_eq!(cache.parsed_files - before, parsed);
            assert_eq!(got, load_dir(&dir));
            got
        };
        let (resources, problems) = check(&mut cache, 3);
        assert_eq!(resources.len(), 4);
        // y duplicated in b.yaml, and b.yaml's broken document.
        assert_eq!(problems.len(), 2, "{problems:#?}");
        check(&mut cache, 0);
        // b.yaml no longer has y: a's y is the only one, reported nowhere, a not parsed again.
        write("b.yaml", &service("w", 5));
        let (resources, problems) = check(&mut cache, 1);
        assert_eq!(resources.len(), 4);
        assert!(problems.is_empty(), "{problems:#?}");
        fs::remove_file(dir.join("c.yaml")).unwrap();
        let (resources, _) = check(&mut cache, 0);
        assert_eq!(resources.len(), 3);
        write("c.yaml", &service("z", 4));
        check(&mut cache, 1);
        fs::remove_dir_all(&dir).unwrap();
    }
}
