//! The state file: the main file and one file per VIP, written only for the
//! VIPs that changed; crashes between the writes leave a readable state.

use std::path::{Path, PathBuf};

use lb_tests::*;
use lb_userspace::{
    controller::Saved,
    services::Services,
    state_file::{self, StateFile},
    HashMode,
};

/// A directory of the test's own, removed also when it fails.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("lb-state-file-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Dir(dir)
    }
}

/// A test's directory, its state file's path, and a balancer to save.
fn setup(name: &str) -> (Dir, PathBuf, Harness) {
    let dir = Dir::new(name);
    let main = dir.0.join("lb0.json");
    (dir, main, Harness::new())
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn save(file: &mut StateFile, h: &mut Harness) {
    file.save(&mut h.services, |services| Saved {
        layout: 7,
        services,
        checks: Vec::new(),
        conn_table_size: 65536,
        ring_capacity: h.dp.ring_capacity(),
        maintenance: false,
    })
    .unwrap();
}

fn vip_files(main: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(main.with_extension("vips"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// The VIPs as JSON, to compare what was saved with what is running.
fn vips_json(vips: &[lb_userspace::services::VipState]) -> serde_json::Value {
    serde_json::to_value(vips).unwrap()
}

#[test]
fn a_change_rewrites_only_its_vips_file_and_the_state_reads_back_whole() {
    let (_dir, main, mut h) = setup("one-change");
    let a = h.vip("203.0.113.10:80/tcp", HashMode::FiveTuple);
    let b = h.vip("203.0.113.10:443/tcp", HashMode::FiveTuple);
    h.backend(&a, "198.51.100.1", 1);
    h.backend(&b, "198.51.100.2", 1);
    let mut file = StateFile::new(main.clone());
    save(&mut file, &mut h);
    let first = vip_files(&main);
    assert_eq!(first.len(), 2, "{first:?}");

    h.backend(&b, "198.51.100.3", 1);
    save(&mut file, &mut h);
    let second = vip_files(&main);
    assert_eq!(second.len(), 2, "the replaced file is gone: {second:?}");
    assert_eq!(second.iter().filter(|n| first.contains(n)).count(), 1, "a's file stayed, b's is new");
    let loaded = state_file::load(&main).unwrap().0.unwrap();
    assert_eq!(vips_json(loaded.services.vips()), vips_json(h.services.snapshot().vips()));

    // Nothing changed: no VIP file is written again.
    save(&mut file, &mut h);
    assert_eq!(vip_files(&main), second);

    // A VIP removed: its file goes with it.
    h.services.remove_vip(&mut h.dp, &a).unwrap();
    save(&mut file, &mut h);
    assert_eq!(vip_files(&main).len(), 1);
    assert_eq!(state_file::load(&main).unwrap().0.unwrap().services.vips().len(), 1);
}

#[test]
fn a_crash_between_the_writes_leaves_the_last_whole_state() {
    let (_dir, main, mut h) = setup("crash");
    let a = h.vip("203.0.113.10:80/tcp", HashMode::FiveTuple);
    h.backend(&a, "198.51.100.1", 1);
    let mut file = StateFile::new(main.clone());
    save(&mut file, &mut h);
    let saved = vips_json(h.services.snapshot().vips());
    // A VIP file written by a save that died before its main file: the
    // main file still names the old one, and the stray file is removed.
    let stray = main.with_extension("vips").join("0-0-1.json");
    std::fs::write(&stray, b"{\"half\": ").unwrap();
    let loaded = state_file::load(&main).unwrap().0.unwrap();
    assert_eq!(vips_json(loaded.services.vips()), saved);
    assert!(!stray.exists(), "the stray file was removed");
    // A main file that names a missing VIP file is refused, saying which.
    let named = vip_files(&main).remove(0);
    std::fs::remove_file(main.with_extension("vips").join(&named)).unwrap();
    let err = state_file::load(&main).err().expect("refused");
    assert!(err.contains(&named), "{err}");
}

#[test]
fn a_state_file_of_an_older_release_with_its_vips_inline_reads() {
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/state-layout-3.json");
    let saved = state_file::load(Path::new(fixture)).unwrap().0.unwrap();
    assert_eq!(saved.layout, 3);
    let ports: Vec<u16> = saved.services.vips().iter().map(|v| v.spec.vip.port).collect();
    assert_eq!(ports, [80, 9000]);
    assert_eq!(saved.services.vips()[0].backends.len(), 3);
}

#[test]
fn an_adopted_state_takes_its_rings_from_the_ring_array_and_keeps_its_vip_files() {
    let (_dir, main, mut h) = setup("adopt");
    let a = h.vip("203.0.113.10:80/tcp", HashMode::FiveTuple);
    for last in 1..=3 {
        h.backend(&a, &format!("198.51.100.{last}"), 1);
    }
    let mut file = StateFile::new(main.clone());
    save(&mut file, &mut h);
    let files = vip_files(&main);
    let live = h.dp.vip(&a.key()).unwrap().unwrap();
    // The ring packets read, marked: a slot of another backend now names
    // the first backend, which no Maglev build would give.
    let mut ring: Vec<u16> = h.services.vip(&a).unwrap().ring().to_vec();
    let first_id = h.services.vip(&a).unwrap().backends[&"198.51.100.1".parse().unwrap()].id as u16;
    let other = ring.iter().position(|&id| id != first_id).unwrap();
    ring[other] = first_id;
    h.dp.write_ring(live.ring_offset, &ring).unwrap();

    let (saved, mut loaded_file) = state_file::load(&main).unwrap();
    h.services = Services::restore(saved.unwrap().services, &h.dp);
    assert_eq!(h.services.vip(&a).unwrap().ring(), &ring[..], "the ring as packets read it");
    assert_eq!(h.services.vip(&a).unwrap().history()[0].members.len(), 3);
    // Nothing changed since: the save writes the main file only.
    save(&mut loaded_file, &mut h);
    assert_eq!(vip_files(&main), files);
}
