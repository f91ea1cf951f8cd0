use super::*;

fn url() -> LonghornUrl {
    LonghornUrl::parse("longhorn+file:///srv/target?volume=pvc-1&backup=backup-abc").unwrap()
}

fn volume_cfg(size: &str) -> Vec<u8> {
    format!(r#"{{"Name":"pvc-1","Size":"{size}","CreatedTime":"","LastBackupName":"backup-abc","BlockCount":"3"}}"#)
        .into_bytes()
}

fn backup_cfg(created: &str, method: &str, blocks: &str) -> Vec<u8> {
    format!(
        r#"{{"Name":"backup-abc","VolumeName":"pvc-1","SnapshotName":"s","CreatedTime":"{created}","Size":"4194304","CompressionMethod":"{method}","Blocks":[{blocks}]}}"#
    )
    .into_bytes()
}

const MIB2: u64 = 2 * 1024 * 1024;

#[test]
fn urls_parse_and_paths_follow_longhorn() {
    let u = url();
    assert_eq!(u.store, StoreUrl::File { root: "/srv/target".into() });
    let s3 = LonghornUrl::parse("longhorn+s3://bucket/some/prefix?backup=b-1&volume=v-1").unwrap();
    assert_eq!(s3.store, StoreUrl::S3 { bucket: "bucket".into(), prefix: "some/prefix".into() });
    // The volume directory is named by the first hex digits of the
    // truncated SHA-512 of the volume name.
    let checksum = longhorn_checksum(b"pvc-1");
    assert_eq!(checksum.len(), 64);
    assert_eq!(u.volume_dir(), format!("backupstore/volumes/{}/{}/pvc-1", &checksum[..2], &checksum[2..4]));
    assert_eq!(u.backup_cfg_key(), format!("{}/backups/backup_backup-abc.cfg", u.volume_dir()));
    let c = "ab".repeat(32);
    assert_eq!(u.block_key(&c), format!("{}/blocks/ab/ab/{c}.blk", u.volume_dir()));
    for bad in [
        "longhorn+file:///srv/target",
        "longhorn+file:///srv/target?volume=pvc-1",
        "longhorn+file:///srv/target?volume=../x&backup=b1",
        "longhorn+file:///srv/target?volume=-x&backup=b1",
        "longhorn+file://relative?volume=v1&backup=b1",
        "longhorn+s3://B?volume=v1&backup=b1",
        "longhorn+file:///srv?volume=v1&backup=b1&extra=1",
    ] {
        assert!(LonghornUrl::parse(bad).is_err(), "{bad} accepted");
    }
}

#[test]
fn configs_become_a_snapshot() {
    let c1 = "11".repeat(32);
    let c2 = "22".repeat(32);
    // Offsets out of order, an identical block at two offsets.
    let blocks = format!(
        r#"{{"Offset":{},"BlockChecksum":"{c1}"}},{{"Offset":0,"BlockChecksum":"{c2}"}},{{"Offset":{},"BlockChecksum":"{c1}"}}"#,
        3 * MIB2,
        MIB2
    );
    let b = LonghornBackup::from_cfgs(
        &url(),
        &volume_cfg(&(8 * MIB2).to_string()),
        &backup_cfg("2026-01-01T00:00:00Z", "lz4", &blocks),
    )
    .unwrap();
    assert_eq!(b.layout().block_count(), 8);
    assert_eq!(b.layout().block_size_bytes(), DEFAULT_BLOCK_SIZE_BYTES);
    assert_eq!(b.blocks().map(|x| x.index).collect::<Vec<_>>(), vec![0, 1, 3]);
    assert!(b.block(2).is_none());
    let one = b.block(1).unwrap();
    assert_eq!(one.expected.compression, Compression::Lz4);
    assert_eq!(one.expected.algorithm, HashAlgorithm::Sha512Trunc256);
    assert_eq!(b.object_key(&one), url().block_key(&c1));
    // The legacy empty method is gzip; "none" stores blocks as they are.
    let legacy =
        LonghornBackup::from_cfgs(&url(), &volume_cfg(&(8 * MIB2).to_string()), &backup_cfg("t", "", &blocks)).unwrap();
    assert_eq!(legacy.compression(), Compression::Gzip);
    let raw =
        LonghornBackup::from_cfgs(&url(), &volume_cfg(&(8 * MIB2).to_string()), &backup_cfg("t", "none", &blocks))
            .unwrap();
    assert_eq!(raw.block(0).unwrap().expected.stored_len_bytes, DEFAULT_BLOCK_SIZE_BYTES);
    // The identity covers the block list.
    assert_eq!(
        legacy.digest(),
        LonghornBackup::from_cfgs(&url(), &volume_cfg(&(8 * MIB2).to_string()), &backup_cfg("t", "", &blocks))
            .unwrap()
            .digest()
    );
    assert_ne!(legacy.digest(), raw.digest());
    let fewer = format!(r#"{{"Offset":0,"BlockChecksum":"{c2}"}}"#);
    let other =
        LonghornBackup::from_cfgs(&url(), &volume_cfg(&(8 * MIB2).to_string()), &backup_cfg("t", "", &fewer)).unwrap();
    assert_ne!(legacy.digest(), other.digest());
}

#[test]
fn bad_configs_are_refused_with_a_reason() {
    let c = "33".repeat(32);
    let size = (4 * MIB2).to_string();
    let one = |offset: &str, checksum: &str| format!(r#"{{"Offset":{offset},"BlockChecksum":"{checksum}"}}"#);
    let cases: Vec<(Vec<u8>, Vec<u8>, &str)> = vec![
        (volume_cfg(&size), backup_cfg("", "lz4", &one("0", &c)), "still in progress"),
        (volume_cfg(&size), backup_cfg("t", "zstd", &one("0", &c)), "unknown CompressionMethod"),
        (volume_cfg(&size), backup_cfg("t", "lz4", &one("4096", &c)), "not a block boundary"),
        (volume_cfg(&size), backup_cfg("t", "lz4", &one(&(4 * MIB2).to_string(), &c)), "not a block boundary"),
        (volume_cfg(&size), backup_cfg("t", "lz4", &one("0", "abc")), "not 64 hex digits"),
        (
            volume_cfg(&size),
            backup_cfg("t", "lz4", &format!("{},{}", one("0", &c), one("0", &"44".repeat(32)))),
            "listed twice",
        ),
        (volume_cfg("1000"), backup_cfg("t", "lz4", ""), "multiple"),
        (volume_cfg("x"), backup_cfg("t", "lz4", ""), "not a Longhorn config"),
        (b"{".to_vec(), backup_cfg("t", "lz4", ""), "not a Longhorn config"),
    ];
    for (volume, backup, says) in cases {
        let e = LonghornBackup::from_cfgs(&url(), &volume, &backup).unwrap_err().to_string();
        assert!(e.contains(says), "{e} does not say {says:?}");
    }
}
