//! The embedded metadata store: a SQLite file in WAL mode.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};

use super::{
    BlobLocation, Durable, IndexOutcome, InstanceRecord, MetaError, MetadataStore, StoredInstance,
};
use crate::ids::PartnerId;

/// Schema migrations, applied in order at start-up.
const MIGRATIONS: &[(i64, &str, &str)] =
    &[(1, "dicom index", include_str!("migrations/0001_index.sql"))];

/// The index in a SQLite file.
#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    known_series: KnownSeries,
}

/// Series (with their study) known to have index rows, so recording another
/// instance of them skips two upserts. Bounded; losing it costs only those
/// upserts. A path that deletes series or studies must invalidate it.
type KnownSeries = moka::sync::Cache<(String, String), ()>;

impl SqliteStore {
    /// Open (creating if needed) `<data_dir>/index.sqlite` and migrate it.
    pub async fn open(data_dir: &Path) -> Result<SqliteStore, MetaError> {
        let url = format!("sqlite://{}", data_dir.join("index.sqlite").display());
        let options = SqliteConnectOptions::from_str(&url)
            .map_err(MetaError::Open)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // NORMAL (WAL): commits survive a process crash; after an OS
            // crash the last ones may be lost, and start-up recovery rebuilds
            // them from the fsynced blob segments (see blob_objects).
            .synchronous(SqliteSynchronous::Normal)
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
        Ok(SqliteStore {
            pool,
            known_series: moka::sync::Cache::new(100_000),
        })
    }

    /// Run the statements of [`MetadataStore::record_instance`] in an open
    /// transaction; the caller commits or rolls back.
    async fn prepare_instance(&self, r: &InstanceRecord) -> Result<Prepared, MetaError> {
        let a = &r.attributes;
        let partner = r.partner.as_str();
        let sha = hex::encode(r.dataset_sha256);
        let series_key = (partner.to_owned(), r.series_uid.as_str().to_owned());
        let series_known = self.known_series.contains_key(&series_key);
        // BEGIN IMMEDIATE takes the write lock up front: the duplicate and
        // conflict decisions below see the state they change. Few statements,
        // because each is a round trip to the connection's thread.
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;

        if !series_known {
            sqlx::query(
                "INSERT INTO studies (partner, study_uid, patient_name, patient_id, issuer_of_patient_id,
                    patient_birth_date, patient_sex, study_date, study_time, accession_number,
                    referring_physician_name, study_id, study_description, specific_character_set,
                    first_received_ms)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                 ON CONFLICT (partner, study_uid) DO NOTHING",
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
        }

        // The same bytes under the same UID: the unique key says duplicate.
        let inserted = sqlx::query(
            "INSERT INTO instances (partner, study_uid, series_uid, sop_instance_uid, sop_class_uid,
                transfer_syntax, instance_number, rows, columns, number_of_frames, received_at_ms,
                size, dataset_sha256, blob_object, blob_offset, blob_length, source, calling_ae)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
             ON CONFLICT (partner, sop_instance_uid, dataset_sha256, transfer_syntax) DO NOTHING",
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
        .bind(to_i64(r.size))
        .bind(&sha)
        .bind(&r.blob.object)
        .bind(to_i64(r.blob.offset))
        .bind(to_i64(r.blob.length))
        .bind(r.source.as_str())
        .bind(&r.calling_ae)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted == 0 {
            return Ok(Prepared {
                tx,
                outcome: IndexOutcome::Duplicate,
                new_series: None,
            });
        }

        // Another object under this UID: flag every version, keep all.
        let flagged = sqlx::query(
            "UPDATE instances SET conflict = 1
             WHERE partner = ?1 AND sop_instance_uid = ?2
               AND (SELECT COUNT(*) FROM instances WHERE partner = ?1 AND sop_instance_uid = ?2) > 1",
        )
        .bind(partner)
        .bind(r.sop_instance_uid.as_str())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let conflict = flagged > 0;

        sqlx::query(
            "INSERT INTO blob_objects (object, resume_at) VALUES (?, ?)
             ON CONFLICT (object) DO UPDATE SET resume_at = MAX(resume_at, excluded.resume_at)",
        )
        .bind(&r.blob.object)
        .bind(to_i64(r.resume_at))
        .execute(&mut *tx)
        .await?;

        Ok(Prepared {
            tx,
            outcome: if conflict {
                IndexOutcome::Conflict
            } else {
                IndexOutcome::Stored
            },
            new_series: (!series_known).then_some(series_key),
        })
    }
}

/// An open transaction holding one instance's statements.
struct Prepared {
    tx: sqlx::Transaction<'static, sqlx::Sqlite>,
    outcome: IndexOutcome,
    /// A series recorded for the first time (to remember once committed).
    new_series: Option<(String, String)>,
}

#[async_trait::async_trait]
impl MetadataStore for SqliteStore {
    async fn record_instance<'a>(
        &self,
        r: &InstanceRecord,
        durable: Durable<'a>,
    ) -> Result<IndexOutcome, MetaError> {
        let prepared = self.prepare_instance(r).await;
        // Whatever happened, the blob's fate must be settled before we return.
        let synced = durable.await;
        let Prepared {
            tx,
            outcome,
            new_series,
        } = prepared?;
        match (outcome, synced) {
            (IndexOutcome::Duplicate, _) => {
                tx.rollback().await?;
                Ok(IndexOutcome::Duplicate)
            }
            (_, Err(e)) => {
                tx.rollback().await?;
                Err(MetaError::NotDurable(e))
            }
            (outcome, Ok(())) => {
                tx.commit().await?;
                if let Some(key) = new_series {
                    self.known_series.insert(key, ());
                }
                Ok(outcome)
            }
        }
    }

    async fn instances_by_sop(
        &self,
        partner: &PartnerId,
        sop_instance_uid: &str,
    ) -> Result<Vec<StoredInstance>, MetaError> {
        let rows = sqlx::query(
            "SELECT study_uid, series_uid, sop_instance_uid, sop_class_uid, transfer_syntax, size,
                    dataset_sha256, blob_object, blob_offset, blob_length, source, calling_ae, conflict
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
                    blob: BlobLocation {
                        object: row.try_get(7)?,
                        offset: u64::try_from(row.try_get::<i64, _>(8)?).unwrap_or(0),
                        length: u64::try_from(row.try_get::<i64, _>(9)?).unwrap_or(0),
                    },
                    source: row.try_get(10)?,
                    calling_ae: row.try_get(11)?,
                    conflict: row.try_get::<i64, _>(12)? != 0,
                })
            })
            .collect()
    }

    async fn blob_resume_points(&self) -> Result<HashMap<String, u64>, MetaError> {
        let rows = sqlx::query("SELECT object, resume_at FROM blob_objects")
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter()
            .map(|row| {
                let at: i64 = row.try_get(1)?;
                Ok((row.try_get(0)?, u64::try_from(at).unwrap_or(0)))
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

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}
