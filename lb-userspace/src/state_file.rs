//! The state file: what a restart needs, saved after every change. At 512
//! VIPs x 100 backends the state is 5 MB of JSON, of which one change
//! touches one VIP's. So each VIP is saved in a file of its own, written
//! when the VIP changed, beside the main file (`IFACE.json`, in
//! `IFACE.vips/`). The main file names them and is replaced last (written,
//! then renamed over the old one): a crash at any point leaves a main file
//! whose VIP files are all there. Files it no longer names are removed.

use std::{
    collections::{BTreeSet, HashMap},
    io,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{
    controller::Saved,
    services::{Services, Snapshot, VipAddr, VipState},
};

/// A VIP in the main file: the name of its file, or (state files of older
/// releases) the VIP itself.
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
pub enum SavedVip {
    File(String),
    Inline(Box<VipState>),
}

pub struct StateFile {
    main: PathBuf,
    dir: PathBuf,
    /// The file of each VIP, as the main file names it now.
    files: HashMap<VipAddr, String>,
    /// VIPs changed since their file was written.
    changed: BTreeSet<VipAddr>,
    /// File names: this controller's start time, then a count.
    prefix: String,
    written: u64,
}

impl StateFile {
    pub fn new(main: PathBuf) -> Self {
        let dir = vip_dir(&main);
        let started = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let prefix = format!("{:x}-{}", started.as_nanos(), std::process::id());
        Self { main, dir, files: HashMap::new(), changed: BTreeSet::new(), prefix, written: 0 }
    }

    pub fn path(&self) -> &Path {
        &self.main
    }

    /// Writes the VIPs that `services` changed (and those without a file
    /// yet) to new files, then the main file that `main` makes from the
    /// VIPs' file names. On a failure nothing is forgotten: the next save
    /// writes the same VIPs again.
    pub fn save(
        &mut self,
        services: &mut Services,
        main: impl FnOnce(Snapshot<SavedVip>) -> Saved<SavedVip>,
    ) -> io::Result<()> {
        self.changed.append(&mut services.take_changed());
        std::fs::create_dir_all(&self.dir)?;
        let mut files = HashMap::with_capacity(self.files.len());
        for vip in services.vips() {
            let name = match self.files.get(&vip.spec.vip) {
                Some(name) if !self.changed.contains(&vip.spec.vip) => name.clone(),
                _ => {
                    self.written += 1;
                    let name = format!("{}-{}.json", self.prefix, self.written);
                    std::fs::write(self.dir.join(&name), serde_json::to_vec(vip)?)?;
                    name
                }
            };
            files.insert(vip.spec.vip, name);
        }
        let saved = main(services.snapshot_as(|vip| SavedVip::File(files[&vip.spec.vip].clone())));
        let tmp = self.main.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(&saved)?)?;
        std::fs::rename(&tmp, &self.main)?;
        for (vip, old) in &self.files {
            if files.get(vip) != Some(old) {
                let _ = std::fs::remove_file(self.dir.join(old));
            }
        }
        self.files = files;
        self.changed.clear();
        Ok(())
    }
}

fn vip_dir(main: &Path) -> PathBuf {
    main.with_extension("vips")
}

/// Reads a state file and the VIP files it names, and removes VIP files it
/// does not name (left by a crash between writing them and the main
/// file). Returns the state (`None`: there is no state file) and the file
/// to save to, which knows the VIP files it read: a VIP that has not
/// changed since keeps its file.
pub fn load(main: &Path) -> Result<(Option<Saved>, StateFile), String> {
    let mut file = StateFile::new(main.to_path_buf());
    let text = match std::fs::read(main) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((None, file)),
        Err(e) => return Err(format!("reading the state file {}: {e}", main.display())),
    };
    let saved: Saved<SavedVip> = serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", main.display()))?;
    let dir = vip_dir(main);
    let mut named = BTreeSet::new();
    let saved = saved
        .try_map_vips(|vip| match vip {
            SavedVip::Inline(vip) => Ok(*vip),
            SavedVip::File(name) => {
                let path = dir.join(&name);
                let text = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
                let vip: VipState = serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", path.display()))?;
                file.files.insert(vip.spec.vip, name.clone());
                named.insert(name);
                Ok(vip)
            }
        })
        .map_err(|e: String| format!("the state file names a VIP file it cannot read ({e})"))?;
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for entry in entries.flatten() {
            if !named.contains(entry.file_name().to_string_lossy().as_ref()) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    Ok((Some(saved), file))
}
