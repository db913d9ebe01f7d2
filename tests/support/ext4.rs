//! Reads an ext4 image without mounting it, so without root: kinds, modes, owners, sizes, device
//! numbers, mtimes, link targets, hard links (inode numbers and link counts), xattrs, file
//! contents and directory listings, through e2fsprogs' `debugfs`, which opens the image read-only
//! unless given `-w` (never passed here).
//!
//! Every query is one `debugfs -f SCRIPT IMAGE` process. In that mode debugfs echoes each command
//! as `debugfs: COMMAND` before its output, which splits the output per command, so a whole tree
//! costs a handful of processes (one per directory depth, one for the inodes, one for xattr values
//! and long symlink targets) instead of one per path. Paths go into the script in double quotes
//! (a `"` doubled, as debugfs' parser reads it), inodes as `<N>`.
//!
//! Limits: a name with a newline or carriage return cannot be written into a script (debugfs cuts
//! the line there) and is refused; names, link targets and xattr names must be UTF-8.

use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The root directory's inode number in every ext4 filesystem.
const ROOT_INO: u64 = 2;

/// How many files one `dump` script writes to disk before they are read and removed: bounds the
/// temp space a big tree needs.
const DUMP_BATCH: usize = 256;

/// What an inode is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink,
    /// A character device.
    CharDevice,
    /// A block device.
    BlockDevice,
    /// A named pipe.
    Fifo,
    /// A Unix socket.
    Socket,
}

impl Kind {
    /// The kind in the `S_IFMT` bits of a full mode.
    pub fn from_mode(mode: u32) -> Option<Kind> {
        Some(match mode & 0o170000 {
            0o100000 => Kind::File,
            0o040000 => Kind::Dir,
            0o120000 => Kind::Symlink,
            0o020000 => Kind::CharDevice,
            0o060000 => Kind::BlockDevice,
            0o010000 => Kind::Fifo,
            0o140000 => Kind::Socket,
            _ => return None,
        })
    }

    /// The kind as `stat`'s `Type:` line names it.
    fn from_debugfs(name: &str) -> Option<Kind> {
        Some(match name {
            "regular" => Kind::File,
            "directory" => Kind::Dir,
            "symlink" => Kind::Symlink,
            "character special" => Kind::CharDevice,
            "block special" => Kind::BlockDevice,
            "FIFO" => Kind::Fifo,
            "socket" => Kind::Socket,
            _ => return None,
        })
    }

    /// One letter, as `ls -l` shows it except `f` for a regular file.
    pub fn letter(self) -> char {
        match self {
            Kind::File => 'f',
            Kind::Dir => 'd',
            Kind::Symlink => 'l',
            Kind::CharDevice => 'c',
            Kind::BlockDevice => 'b',
            Kind::Fifo => 'p',
            Kind::Socket => 's',
        }
    }
}

/// One inode's metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inode {
    /// The inode number.
    pub ino: u64,
    /// What it is.
    pub kind: Kind,
    /// The permission bits with setuid, setgid and sticky (`mode & 0o7777`).
    pub mode: u32,
    /// The owner (all 32 bits).
    pub uid: u32,
    /// The group (all 32 bits).
    pub gid: u32,
    /// The size in bytes (a directory's is its blocks').
    pub size: u64,
    /// The link count: names of a file, or 2 + subdirectories of a directory.
    pub nlink: u32,
    /// The modification time, whole seconds since the epoch.
    pub mtime: i64,
    /// `(major, minor)` of a device node.
    pub rdev: Option<(u32, u32)>,
    /// A symlink's target.
    pub link_target: Option<String>,
    /// Every extended attribute, by full name (`user.x`, `security.capability`, ...).
    pub xattrs: BTreeMap<String, Vec<u8>>,
}

/// A name in a directory, as `ls -p` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    /// The name (no `/`).
    pub name: String,
    /// Its inode.
    pub ino: u64,
    /// What the inode is.
    pub kind: Kind,
}

/// A path in the image (relative, no leading `/`) and its inode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// `a/b/c`.
    pub path: String,
    /// The inode the name leads to (shared by hard links).
    pub inode: Inode,
}

/// An ext4 image file, read through `debugfs`.
#[derive(Debug, Clone)]
pub struct Ext4Image {
    path: PathBuf,
}

impl Ext4Image {
    /// The image at `path`; fails unless debugfs opens it as an ext4 filesystem.
    pub fn open(path: impl Into<PathBuf>) -> Result<Ext4Image, String> {
        let image = Ext4Image { path: path.into() };
        image.stat("/")?;
        Ok(image)
    }

    /// The image file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The inode `path` names (relative to the root; a leading `/` is optional). Like `lstat`: a
    /// symlink in the last component is not followed, one in a directory component is.
    pub fn stat(&self, path: &str) -> Result<Inode, String> {
        let spec = quote(&absolute(path))?;
        let inode = self.inodes_of(&[spec])?.pop();
        inode.ok_or_else(|| format!("{}: no inode for {path}", self.path.display()))
    }

    /// The target of the symlink `path`.
    pub fn read_link(&self, path: &str) -> Result<PathBuf, String> {
        let inode = self.stat(path)?;
        inode
            .link_target
            .map(PathBuf::from)
            .ok_or_else(|| format!("{path} is a {:?}, not a symlink", inode.kind))
    }

    /// The contents of the regular file `path` (a symlink in the last component is not followed).
    pub fn read(&self, path: &str) -> Result<Vec<u8>, String> {
        let inode = self.stat(path)?;
        if inode.kind != Kind::File {
            return Err(format!("{path} is a {:?}, not a file", inode.kind));
        }
        let mut contents = Vec::new();
        self.for_each_content(&[inode.ino], |_, bytes| contents = bytes.to_vec())?;
        Ok(contents)
    }

    /// The names in directory `path` without `.` and `..`, sorted.
    pub fn read_dir(&self, path: &str) -> Result<Vec<DirEntry>, String> {
        let spec = quote(&absolute(path))?;
        let mut sections = self.run(&[format!("ls -p {spec}")])?;
        let mut entries = parse_ls(&take_text(&mut sections, 0)?)?;
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(entries)
    }

    /// Every path under the root (the root itself left out) with its inode, sorted by path.
    pub fn walk(&self) -> Result<Vec<Entry>, String> {
        let names = self.names_under_root()?;
        let mut inos: Vec<u64> = names.iter().map(|(_, ino)| *ino).collect();
        inos.sort_unstable();
        inos.dedup();
        let specs: Vec<String> = inos.iter().map(|ino| format!("<{ino}>")).collect();
        let by_ino: HashMap<u64, Inode> = self
            .inodes_of(&specs)?
            .into_iter()
            .map(|inode| (inode.ino, inode))
            .collect();
        let mut entries = names
            .into_iter()
            .map(|(path, ino)| {
                let inode = by_ino
                    .get(&ino)
                    .cloned()
                    .ok_or_else(|| format!("{path}: inode {ino} was not listed"))?;
                Ok(Entry { path, inode })
            })
            .collect::<Result<Vec<_>, String>>()?;
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(entries)
    }

    /// Calls `f` with each inode of `inos` and its contents (regular files), a batch of files
    /// dumped to a temp dir at a time.
    pub fn for_each_content(
        &self,
        inos: &[u64],
        mut f: impl FnMut(u64, &[u8]),
    ) -> Result<(), String> {
        for batch in inos.chunks(DUMP_BATCH) {
            let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
            let mut commands = Vec::new();
            for ino in batch {
                let out = quote(&dir.path().join(ino.to_string()).to_string_lossy())?;
                commands.push(format!("dump <{ino}> {out}"));
            }
            self.run(&commands)?;
            for ino in batch {
                let file = dir.path().join(ino.to_string());
                let bytes = std::fs::read(&file).map_err(|e| format!("dumped inode {ino}: {e}"))?;
                f(*ino, &bytes);
            }
        }
        Ok(())
    }

    /// `(path, inode number)` of every name under the root: one `ls -p` script per depth.
    fn names_under_root(&self) -> Result<Vec<(String, u64)>, String> {
        let mut names = Vec::new();
        let mut level = vec![(String::new(), ROOT_INO)];
        while !level.is_empty() {
            let commands: Vec<String> = level.iter().map(|(_, i)| format!("ls -p <{i}>")).collect();
            let mut sections = self.run(&commands)?;
            let mut next = Vec::new();
            for (i, (dir, _)) in level.iter().enumerate() {
                for entry in parse_ls(&take_text(&mut sections, i)?)? {
                    let path = if dir.is_empty() {
                        entry.name
                    } else {
                        format!("{dir}/{}", entry.name)
                    };
                    if entry.kind == Kind::Dir {
                        next.push((path.clone(), entry.ino));
                    }
                    names.push((path, entry.ino));
                }
            }
            level = next;
        }
        Ok(names)
    }

    /// The inodes `specs` (quoted paths or `<N>`) name, in order: one `stat` script, then one
    /// script for what `stat` does not show in full (xattr values, long symlink targets).
    fn inodes_of(&self, specs: &[String]) -> Result<Vec<Inode>, String> {
        let commands: Vec<String> = specs.iter().map(|s| format!("stat {s}")).collect();
        let mut sections = self.run(&commands)?;
        let mut stats = Vec::new();
        for (i, spec) in specs.iter().enumerate() {
            let text = take_text(&mut sections, i)?;
            stats.push(parse_stat(&text).map_err(|e| format!("stat {spec}: {e}"))?);
        }
        self.complete(stats)
    }

    /// Fills in xattr values (`ea_get -x`, exact bytes in hex: `stat` leaves out values of 40
    /// bytes and more) and the targets of symlinks too long to live in the inode (`dump`).
    fn complete(&self, stats: Vec<Stat>) -> Result<Vec<Inode>, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
        let mut commands = Vec::new();
        for stat in &stats {
            let ino = stat.inode.ino;
            for name in &stat.xattr_names {
                commands.push(format!("ea_get -x <{ino}> {}", quote(name)?));
            }
            if stat.inode.kind == Kind::Symlink && stat.inode.link_target.is_none() {
                let out = quote(&dir.path().join(ino.to_string()).to_string_lossy())?;
                commands.push(format!("dump <{ino}> {out}"));
            }
        }
        let mut sections = if commands.is_empty() {
            Vec::new()
        } else {
            self.run(&commands)?
        };
        let mut next = 0;
        let mut inodes = Vec::new();
        for Stat {
            mut inode,
            xattr_names,
        } in stats
        {
            for name in xattr_names {
                let value = parse_ea_get(&take_text(&mut sections, next)?, &name)?;
                next += 1;
                inode.xattrs.insert(name, value);
            }
            if inode.kind == Kind::Symlink && inode.link_target.is_none() {
                next += 1;
                let file = dir.path().join(inode.ino.to_string());
                let target = std::fs::read(&file)
                    .map_err(|e| format!("symlink inode {}: {e}", inode.ino))?;
                inode.link_target = Some(utf8(target)?);
            }
            inodes.push(inode);
        }
        Ok(inodes)
    }

    /// Runs `commands` as one debugfs script and returns each command's output. Fails on any
    /// error debugfs reports (it exits 0 regardless; errors are lines on stderr besides its
    /// version banner).
    fn run(&self, commands: &[String]) -> Result<Vec<Option<Vec<u8>>>, String> {
        let mut script = tempfile::NamedTempFile::new().map_err(|e| format!("temp file: {e}"))?;
        for command in commands {
            writeln!(script, "{command}").map_err(|e| format!("debugfs script: {e}"))?;
        }
        script.flush().map_err(|e| format!("debugfs script: {e}"))?;
        let output = Command::new("debugfs")
            .arg("-f")
            .arg(script.path())
            .arg(&self.path)
            .env("PATH", path_with_sbin())
            .output()
            .map_err(|e| format!("cannot run debugfs ({e}); apt-get install e2fsprogs"))?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        let errors: Vec<&str> = stderr
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with("debugfs "))
            .collect();
        if !output.status.success() || !errors.is_empty() {
            return Err(format!(
                "debugfs {} ({}): {}",
                self.path.display(),
                output.status,
                errors.join("; ")
            ));
        }
        split_sections(&output.stdout, commands)
    }
}

/// What `stat` shows of an inode, and the names of its xattrs (values filled in later).
struct Stat {
    inode: Inode,
    xattr_names: Vec<String>,
}

/// `path` from the root, for debugfs (whose working directory is the root).
fn absolute(path: &str) -> String {
    format!("/{}", path.trim_start_matches('/'))
}

/// `text` as one debugfs argument: in double quotes, a `"` doubled. Refuses what a script line
/// cannot carry.
fn quote(text: &str) -> Result<String, String> {
    if text.contains(['\n', '\r']) {
        return Err(format!("{text:?}: a debugfs script line cannot carry it"));
    }
    Ok(format!("\"{}\"", text.replace('"', "\"\"")))
}

/// The PATH debugfs is looked up in: the caller's, then where Debian puts it (`/usr/sbin` is not
/// on an ordinary user's PATH).
fn path_with_sbin() -> String {
    let path = std::env::var("PATH").unwrap_or_default();
    format!("{path}:/usr/sbin:/sbin")
}

/// Splits a script's stdout at each command's echo (`debugfs: COMMAND`), in order: the output
/// of command `i` is what lies between its echo and the next one.
fn split_sections(stdout: &[u8], commands: &[String]) -> Result<Vec<Option<Vec<u8>>>, String> {
    let echo = |command: &str| format!("debugfs: {command}\n").into_bytes();
    let mut starts = Vec::with_capacity(commands.len());
    let mut from = 0;
    for command in commands {
        let marker = echo(command);
        let at = find(&stdout[from..], &marker)
            .ok_or_else(|| format!("debugfs did not run `{command}`"))?;
        starts.push((from + at, from + at + marker.len()));
        from += at + marker.len();
    }
    let mut sections = Vec::with_capacity(commands.len());
    for (i, &(_, body)) in starts.iter().enumerate() {
        let end = starts.get(i + 1).map_or(stdout.len(), |&(echo, _)| echo);
        sections.push(Some(stdout[body..end].to_vec()));
    }
    Ok(sections)
}

/// The first index of `needle` in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Section `i` as UTF-8 text, taken out of `sections`.
fn take_text(sections: &mut [Option<Vec<u8>>], i: usize) -> Result<String, String> {
    let bytes = sections
        .get_mut(i)
        .and_then(Option::take)
        .ok_or_else(|| format!("no output for debugfs command {i}"))?;
    utf8(bytes)
}

fn utf8(bytes: Vec<u8>) -> Result<String, String> {
    String::from_utf8(bytes).map_err(|e| format!("not UTF-8: {e}"))
}

/// `ls -p` lines: `/INODE/MODE/UID/GID/NAME/SIZE/`, mode in octal with the type bits; `.` and
/// `..` left out, and so are unused slots (inode 0: what a directory block holds after its last
/// entry or a removed one, which the kernel skips too).
fn parse_ls(text: &str) -> Result<Vec<DirEntry>, String> {
    let mut entries = Vec::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        let fields: Vec<&str> = line.split('/').collect();
        let [_, ino, mode, _, _, name, ..] = fields[..] else {
            return Err(format!("ls -p line {line:?}"));
        };
        if name == "." || name == ".." || ino == "0" {
            continue;
        }
        let mode = u32::from_str_radix(mode, 8).map_err(|e| format!("{line:?}: {e}"))?;
        entries.push(DirEntry {
            name: name.to_owned(),
            ino: number(ino, line)?,
            kind: Kind::from_mode(mode).ok_or_else(|| format!("{line:?}: no file type"))?,
        });
    }
    Ok(entries)
}

/// One `stat` section (debugfs' `dump_inode`): the lines `Inode: N   Type: T    Mode:  0755`,
/// `User: U   Group: G   Project: P   Size: S`, `Links: N`, `mtime: 0xSECS[:EXTRA] -- date`,
/// `[(New-style) ]Device major/minor number: MA:MI (hex ..)`, `Fast link dest: "T"` and the
/// `Extended attributes:` block (`  NAME (LEN)[ = VALUE]` lines).
fn parse_stat(text: &str) -> Result<Stat, String> {
    let line = |prefix: &str| {
        text.lines()
            .find(|l| l.trim_start().starts_with(prefix))
            .ok_or_else(|| format!("no `{prefix}` line in {text:?}"))
    };
    let inode_line = line("Inode:")?;
    let user_line = line("User:")?;
    let type_name = inode_line
        .split_once("Type:")
        .and_then(|(_, rest)| rest.split_once("Mode:"))
        .map(|(kind, _)| kind.trim())
        .ok_or_else(|| format!("{inode_line:?}: no type"))?;
    let kind = Kind::from_debugfs(type_name).ok_or_else(|| format!("type {type_name:?}"))?;
    let mode = token_after(inode_line, "Mode:")?;
    let inode = Inode {
        ino: number(token_after(inode_line, "Inode:")?, inode_line)?,
        kind,
        mode: u32::from_str_radix(mode, 8).map_err(|e| format!("mode {mode:?}: {e}"))?,
        uid: number(token_after(user_line, "User:")?, user_line)?,
        gid: number(token_after(user_line, "Group:")?, user_line)?,
        size: number(token_after(user_line, "Size:")?, user_line)?,
        nlink: number(token_after(line("Links:")?, "Links:")?, text)?,
        mtime: parse_mtime(line("mtime:")?)?,
        rdev: parse_rdev(text)?,
        link_target: parse_fast_link(text),
        xattrs: BTreeMap::new(),
    };
    Ok(Stat {
        inode,
        xattr_names: parse_xattr_names(text),
    })
}

/// The whitespace-delimited word after `key` in `line`.
fn token_after<'a>(line: &'a str, key: &str) -> Result<&'a str, String> {
    line.split_once(key)
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .ok_or_else(|| format!("no {key} in {line:?}"))
}

fn number<T: std::str::FromStr>(word: &str, context: &str) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    word.parse()
        .map_err(|e| format!("{word:?} in {context:?}: {e}"))
}

/// ` mtime: 0xSECS:EXTRA -- date` (large inodes) or `mtime: 0xSECS -- date`: the seconds are
/// a signed 32-bit count, and the low two bits of EXTRA extend it past 2038.
fn parse_mtime(line: &str) -> Result<i64, String> {
    let word = token_after(line, "mtime:")?;
    let hex = |h: &str| u32::from_str_radix(h, 16).map_err(|e| format!("{line:?}: {e}"));
    let word = word.trim_start_matches("0x");
    let (secs, extra) = match word.split_once(':') {
        Some((secs, extra)) => (hex(secs)?, hex(extra)?),
        None => (hex(word)?, 0),
    };
    Ok(i64::from(secs as i32) + (i64::from(extra & 3) << 32))
}

/// `Device major/minor number: MA:MI (hex ..)`, decimal, for device nodes.
fn parse_rdev(text: &str) -> Result<Option<(u32, u32)>, String> {
    let key = "Device major/minor number:";
    let Some(line) = text.lines().find(|l| l.contains(key)) else {
        return Ok(None);
    };
    let word = token_after(line, key)?;
    let (major, minor) = word
        .split_once(':')
        .ok_or_else(|| format!("{line:?}: no major:minor"))?;
    Ok(Some((number(major, line)?, number(minor, line)?)))
}

/// `Fast link dest: "TARGET"`: a target short enough to live in the inode, printed as it is.
fn parse_fast_link(text: &str) -> Option<String> {
    let rest = text
        .lines()
        .find_map(|l| l.strip_prefix("Fast link dest: \""))?;
    Some(rest.strip_suffix('"').unwrap_or(rest).to_owned())
}

/// The names in the `Extended attributes:` block: `  NAME (LEN)` and maybe ` = VALUE`.
fn parse_xattr_names(text: &str) -> Vec<String> {
    text.lines()
        .skip_while(|l| *l != "Extended attributes:")
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| {
            l.trim_start()
                .split_once(" (")
                .map(|(name, _)| name.to_owned())
        })
        .collect()
}

/// `ea_get -x`: `NAME (LEN)` then ` = ` and each byte in hex, or nothing for an empty value.
fn parse_ea_get(text: &str, name: &str) -> Result<Vec<u8>, String> {
    let line = text
        .lines()
        .find(|l| !l.is_empty())
        .ok_or_else(|| format!("ea_get {name}: no output"))?;
    let (head, hex) = line.split_once(" = ").unwrap_or((line, ""));
    let len: usize = head
        .rsplit_once(" (")
        .and_then(|(_, len)| len.strip_suffix(')'))
        .ok_or_else(|| format!("ea_get {name}: {line:?}"))
        .and_then(|len| number(len, line))?;
    let value = hex
        .split_whitespace()
        .map(|b| u8::from_str_radix(b, 16).map_err(|e| format!("ea_get {name}: {b:?}: {e}")))
        .collect::<Result<Vec<u8>, String>>()?;
    if value.len() != len {
        return Err(format!(
            "ea_get {name}: {len} bytes announced, {value:?} read"
        ));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use std::time::{Duration, SystemTime};

    /// A tree with every kind `mkfs.ext4 -d` copies as any user, made into an image, then given
    /// (with `debugfs -w`, as the library's rootless build does) what only root could set on the
    /// tree: other owners, a device node, xattrs.
    fn sample() -> (tempfile::TempDir, Ext4Image) {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(src.join("d/sub")).unwrap();
        std::fs::write(src.join("d/file"), b"hello\n").unwrap();
        std::fs::hard_link(src.join("d/file"), src.join("d/hard")).unwrap();
        std::os::unix::fs::symlink("file", src.join("d/short")).unwrap();
        std::os::unix::fs::symlink("t".repeat(100), src.join("long")).unwrap();
        std::os::unix::fs::symlink("d", src.join("dl")).unwrap();
        std::fs::write(src.join("q\"uote d"), vec![0u8; 70_000]).unwrap();
        let fifo = std::ffi::CString::new(src.join("fifo").to_str().unwrap()).unwrap();
        // SAFETY: `fifo` is a valid NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o640) }, 0);
        let file = std::fs::File::options()
            .write(true)
            .open(src.join("d/file"))
            .unwrap();
        file.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(1_234_567_890))
            .unwrap();
        let image = dir.path().join("image.ext4");
        let out = Command::new("mkfs.ext4")
            .args(["-q", "-d"])
            .arg(&src)
            .arg(&image)
            .arg("8M")
            .env("PATH", path_with_sbin())
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        std::fs::write(dir.path().join("bin.val"), [0u8, 1, 0xff, b'"']).unwrap();
        std::fs::write(dir.path().join("long.val"), "v".repeat(100)).unwrap();
        let script = format!(
            "sif /d/file uid 100000\nsif /d/file gid 1001\nsif /d/file mode 0104750\n\
             cd /d\nmknod chr c 1 3\nsif chr mode 020620\ncd /\n\
             ea_set /d/file user.short hi\n\
             ea_set -f {0}/bin.val /d/file trusted.bin\n\
             ea_set -f {0}/long.val /d/file user.long\n",
            dir.path().display()
        );
        std::fs::write(dir.path().join("edit.script"), script).unwrap();
        let out = Command::new("debugfs")
            .arg("-w")
            .arg("-f")
            .arg(dir.path().join("edit.script"))
            .arg(&image)
            .env("PATH", path_with_sbin())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.lines().all(|l| l.starts_with("debugfs ")),
            "{stderr}"
        );
        (dir, Ext4Image::open(&image).unwrap())
    }

    #[test]
    fn reads_what_the_tree_and_debugfs_gave_each_inode() {
        let (dir, image) = sample();
        let me = std::fs::metadata(dir.path()).unwrap();
        let file = image.stat("d/file").unwrap();
        assert_eq!(file.kind, Kind::File);
        assert_eq!((file.uid, file.gid, file.mode), (100_000, 1001, 0o4750));
        assert_eq!((file.size, file.nlink, file.mtime), (6, 2, 1_234_567_890));
        assert_eq!(file.rdev, None);
        let xattrs: Vec<(&str, &[u8])> = file
            .xattrs
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_slice()))
            .collect();
        let long = "v".repeat(100);
        assert_eq!(
            xattrs,
            [
                ("trusted.bin", &[0u8, 1, 0xff, b'"'][..]),
                ("user.long", long.as_bytes()),
                ("user.short", b"hi"),
            ]
        );
        assert_eq!(image.stat("/d/hard").unwrap(), file);
        assert_eq!(image.read("d/file").unwrap(), b"hello\n");

        let chr = image.stat("d/chr").unwrap();
        assert_eq!(
            (chr.kind, chr.rdev, chr.mode),
            (Kind::CharDevice, Some((1, 3)), 0o620)
        );
        let fifo = image.stat("fifo").unwrap();
        assert_eq!((fifo.kind, fifo.mode), (Kind::Fifo, 0o640));
        // Copied from the tree: the current user's owner.
        assert_eq!((fifo.uid, fifo.gid), (me.uid(), me.gid()));

        assert_eq!(image.read_link("d/short").unwrap(), Path::new("file"));
        assert_eq!(
            image.read_link("long").unwrap(),
            Path::new(&"t".repeat(100))
        );
        assert_eq!(image.read("q\"uote d").unwrap(), vec![0u8; 70_000]);
        // A symlink in a directory component is followed, as the kernel would.
        assert_eq!(image.stat("dl/file").unwrap(), file);
        assert_eq!(image.stat("dl").unwrap().kind, Kind::Symlink);
        assert!(image.read("d/short").is_err(), "a symlink is not a file");
        assert!(image.stat("nothing").is_err());
        assert!(image.read_link("d/file").is_err());
    }

    #[test]
    fn walks_and_lists_every_name() {
        let (_dir, image) = sample();
        let listed: Vec<(String, char)> = image
            .read_dir("d")
            .unwrap()
            .into_iter()
            .map(|e| (e.name, e.kind.letter()))
            .collect();
        let want = [
            ("chr", 'c'),
            ("file", 'f'),
            ("hard", 'f'),
            ("short", 'l'),
            ("sub", 'd'),
        ];
        assert_eq!(listed, want.map(|(n, k)| (n.to_owned(), k)).to_vec());
        let walked = image.walk().unwrap();
        let paths: Vec<(&str, char)> = walked
            .iter()
            .map(|e| (e.path.as_str(), e.inode.kind.letter()))
            .collect();
        assert_eq!(
            paths,
            [
                ("d", 'd'),
                ("d/chr", 'c'),
                ("d/file", 'f'),
                ("d/hard", 'f'),
                ("d/short", 'l'),
                ("d/sub", 'd'),
                ("dl", 'l'),
                ("fifo", 'p'),
                ("long", 'l'),
                ("lost+found", 'd'),
                ("q\"uote d", 'f'),
            ]
        );
        // The walk's inodes are stat's, xattrs and long targets included.
        for entry in &walked {
            assert_eq!(
                entry.inode,
                image.stat(&entry.path).unwrap(),
                "{}",
                entry.path
            );
        }
        let mut contents = Vec::new();
        let files: Vec<u64> = walked
            .iter()
            .filter(|e| e.inode.kind == Kind::File)
            .map(|e| e.inode.ino)
            .collect();
        image
            .for_each_content(&files, |ino, bytes| contents.push((ino, bytes.len())))
            .unwrap();
        assert_eq!(
            contents.iter().map(|c| c.1).collect::<Vec<_>>(),
            [6, 6, 70_000]
        );
    }

    #[test]
    fn refuses_what_is_not_an_image_or_a_script_line() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("junk"), vec![0u8; 65536]).unwrap();
        assert!(Ext4Image::open(dir.path().join("junk")).is_err());
        assert!(Ext4Image::open(dir.path().join("missing")).is_err());
        assert!(quote("a\nb").is_err());
        assert_eq!(quote("a\"b").unwrap(), "\"a\"\"b\"");
    }

    #[test]
    fn parses_mtimes_past_2038_and_before_1970() {
        let line = " mtime: 0x00000001:00000001 -- x";
        assert_eq!(parse_mtime(line).unwrap(), (1 << 32) + 1);
        assert_eq!(parse_mtime("mtime: 0xffffffff -- x").unwrap(), -1);
    }
}
