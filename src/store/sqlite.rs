//! The embedded metadata store: a SQLite file in WAL mode.

use std::borrow::Cow;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};

use super::{IndexOutcome, InstanceRecord, MetaError, MetadataStore, StoredInstance};
use crate::ids::PartnerId;

/// Schema migrations, applied in order at start-up.
const MIGRATIONS: &[(i64, &str, &str)] =
    &[(1, "dicom index", include_str!("migrations/0001_index.sql"))];

/// The index in a SQLite file.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    /// Open (creating if needed) `<data_dir>/index.sqlite` and migrate it.
    pub async fn open(data_dir: &Path) -> Result<SqliteStore, MetaError> {
        let url = format!("sqlite://{}", data_dir.join("index.sqlite").display());
        let options = SqliteConnectOptions::from_str(&url)
            .map_err(MetaError::Open)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: a commit is on disk before we acknowledge an instance.
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(30));
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(options)
            .await
            .map_err(MetaError::Open)?;
        let migrations = MIGRATIONS
            .iter()
            .map(|(version, description, sql)| {
                Migration::new(
                    *version,
                    Cow::Borrowed(*description),
                    MigrationType::Simple,
                    Cow::Borrowed(*sql),
                    false,
                )
            })
            .collect::<Vec<_>>();
        let migrator = Migrator {
            migrations: Cow::Owned(migrations),
            ..Migrator::DEFAULT
        };
        migrator.run(&pool).await.map_err(MetaError::Migrate)?;
        Ok(SqliteStore { pool })
    }
}

#[async_trait::async_trait]
impl MetadataStore for SqliteStore {
    async fn record_instance(&self, r: &InstanceRecord) -> Result<IndexOutcome, MetaError> {
        let a = &r.attributes;
        let partner = r.partner.as_str();
        let sha = hex::encode(r.dataset_sha256);
        // BEGIN IMMEDIATE takes the write lock up front, so the duplicate check
        // and the insert see the same state.
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;

        let existing = sqlx::query(
            "SELECT dataset_sha256, transfer_syntax FROM instances
             WHERE partner = ? AND sop_instance_uid = ?",
        )
        .bind(partner)
        .bind(r.sop_instance_uid.as_str())
        .fetch_all(&mut *tx)
        .await?;
        let same = existing.iter().any(|row| {
            row.get::<String, _>(0) == sha && row.get::<String, _>(1) == r.transfer_syntax.as_str()
        });
        if same {
            tx.rollback().await?;
            return Ok(IndexOutcome::Duplicate);
        }
        let conflict = !existing.is_empty();

        sqlx::query(
            "INSERT INTO studies (partner, study_uid, patient_name, patient_id, issuer_of_patient_id,
                patient_birth_date, patient_sex, study_date, study_time, accession_number,
                referring_physician_name, study_id, study_description, specific_character_set,
                first_received_ms, last_received_ms)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
             ON CONFLICT (partner, study_uid) DO UPDATE SET last_received_ms = excluded.last_received_ms",
        )
        .bind(partner)
        .bind(r.study_uid.as_str())
        .bind(&a.patient_name)
        .bind(&a.patient_id)
        .bind(&a.issuer_of_patient_id)
        .bind(&a.patient_birth_date)
        .bind(&a.patient_sex)
        .bind(&a.study_date)
        .bind(&a.study_time)
        .bind(&a.accession_number)
        .bind(&a.referring_physician_name)
        .bind(&a.study_id)
        .bind(&a.study_description)
        .bind(&a.specific_character_set)
        .bind(r.received_at_ms)
        .bind(r.received_at_ms)
        .execute(&mut *tx)
        .await?;

        sqlx::query(
            "INSERT INTO series (partner, series_uid, study_uid, modality, series_number,
                series_description, series_date, series_time, body_part_examined)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
             ON CONFLICT (partner, series_uid) DO NOTHING",
        )
        .bind(partner)
        .bind(r.series_uid.as_str())
        .bind(r.study_uid.as_str())
        .bind(&a.modality)
        .bind(a.series_number)
        .bind(&a.series_description)
        .bind(&a.series_date)
        .bind(&a.series_time)
        .bind(&a.body_part_examined)
        .execute(&mut *tx)
        .await?;

        if conflict {
            sqlx::query(
                "UPDATE instances SET conflict = 1 WHERE partner = ? AND sop_instance_uid = ?",
            )
            .bind(partner)
            .bind(r.sop_instance_uid.as_str())
            .execute(&mut *tx)
            .await?;
        }

        sqlx::query(
            "INSERT INTO instances (partner, study_uid, series_uid, sop_instance_uid, sop_class_uid,
                transfer_syntax, instance_number, rows, columns, number_of_frames, received_at_ms,
                size, dataset_sha256, blob_key, source, calling_ae, conflict)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(partner)
        .bind(r.study_uid.as_str())
        .bind(r.series_uid.as_str())
        .bind(r.sop_instance_uid.as_str())
        .bind(r.sop_class_uid.as_str())
        .bind(r.transfer_syntax.as_str())
        .bind(a.instance_number)
        .bind(a.rows)
        .bind(a.columns)
        .bind(a.number_of_frames)
        .bind(r.received_at_ms)
        .bind(i64::try_from(r.size).unwrap_or(i64::MAX))
        .bind(&sha)
        .bind(r.blob_key.as_str())
        .bind(r.source.as_str())
        .bind(&r.calling_ae)
        .bind(conflict)
        .execute(&mut *tx)
        .await?;

        tx.commit().await?;
        Ok(if conflict {
            IndexOutcome::Conflict
        } else {
            IndexOutcome::Stored
        })
    }

    async fn instances_by_sop(
        &self,
        partner: &PartnerId,
        sop_instance_uid: &str,
    ) -> Result<Vec<StoredInstance>, MetaError> {
        let rows = sqlx::query(
            "SELECT study_uid, series_uid, sop_instance_uid, sop_class_uid, transfer_syntax, size,
                    dataset_sha256, blob_key, source, calling_ae, conflict
             FROM instances WHERE partner = ? AND sop_instance_uid = ? ORDER BY id",
        )
        .bind(partner.as_str())
        .bind(sop_instance_uid)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|row| {
                Ok(StoredInstance {
                    partner: partner.clone(),
                    study_uid: row.try_get(0)?,
                    series_uid: row.try_get(1)?,
                    sop_instance_uid: row.try_get(2)?,
                    sop_class_uid: row.try_get(3)?,
                    transfer_syntax: row.try_get(4)?,
                    size: u64::try_from(row.try_get::<i64, _>(5)?).unwrap_or(0),
                    dataset_sha256: row.try_get(6)?,
                    blob_key: super::BlobKey::from_stored(row.try_get(7)?),
                    source: row.try_get(8)?,
                    calling_ae: row.try_get(9)?,
                    conflict: row.try_get::<i64, _>(10)? != 0,
                })
            })
            .collect()
    }

    async fn instance_count(&self) -> Result<i64, MetaError> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM instances")
            .fetch_one(&self.pool)
            .await?)
    }

    async fn ping(&self) -> Result<(), MetaError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}
