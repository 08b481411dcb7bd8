//! The embedded metadata store: a SQLite file in WAL mode.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};

use super::{IndexOutcome, InstanceRecord, MetaError, MetadataStore};

/// Schema migrations, applied in order at start-up.
const MIGRATIONS: &[(i64, &str, &str)] =
    &[(1, "dicom index", include_str!("migrations/0001_index.sql"))];

/// The index in a SQLite file.
#[derive(Clone)]
pub struct SqliteStore {
    /// The single connection that writes.
    writer: SqlitePool,
    /// Connections for queries.
    reader: SqlitePool,
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
        // SQLite has one writer at a time anyway. One connection for all
        // writes keeps its page cache valid between transactions; with a
        // pool, each write on another connection re-read pages from disk.
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone())
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
        migrator.run(&writer).await.map_err(MetaError::Migrate)?;
        let reader = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(options.read_only(true))
            .await
            .map_err(MetaError::Open)?;
        Ok(SqliteStore {
            writer,
            reader,
            known_series: moka::sync::Cache::new(100_000),
        })
    }
}

/// The study and series rows of a record, if they are new.
async fn upsert_study_and_series(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    r: &InstanceRecord,
) -> Result<(), MetaError> {
    let a = &r.attributes;
    let partner = r.partner.as_str();
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
    .execute(&mut **tx)
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
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// The instance row.
async fn insert_instance<'e, E>(executor: E, r: &InstanceRecord) -> Result<IndexOutcome, MetaError>
where
    E: sqlx::Executor<'e, Database = sqlx::Sqlite>,
{
    let a = &r.attributes;
    let partner = r.partner.as_str();
    let sha = hex::encode(r.dataset_sha256);
    // One statement: the unique key says duplicate (no row returned);
    // the subquery says conflict; triggers flag the other versions and
    // advance the blob store's recovery point.
    let inserted = sqlx::query(
        "INSERT INTO instances (partner, study_uid, series_uid, sop_instance_uid, sop_class_uid,
            transfer_syntax, instance_number, rows, columns, number_of_frames, received_at_ms,
            size, dataset_sha256, blob_object, blob_offset, blob_length, blob_resume_at,
            source, calling_ae, conflict)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19,
            EXISTS (SELECT 1 FROM instances WHERE partner = ?1 AND sop_instance_uid = ?4))
         ON CONFLICT (partner, sop_instance_uid, dataset_sha256, transfer_syntax) DO NOTHING
         RETURNING conflict",
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
    .bind(to_i64(r.resume_at))
    .bind(r.source.as_str())
    .bind(&r.calling_ae)
    .fetch_optional(executor)
    .await?;
    let Some(row) = inserted else {
        return Ok(IndexOutcome::Duplicate);
    };
    Ok(if row.try_get::<i64, _>(0)? != 0 {
        IndexOutcome::Conflict
    } else {
        IndexOutcome::Stored
    })
}

#[async_trait::async_trait]
impl MetadataStore for SqliteStore {
    async fn record_instance(&self, r: &InstanceRecord) -> Result<IndexOutcome, MetaError> {
        let series_key = (
            r.partner.as_str().to_owned(),
            r.series_uid.as_str().to_owned(),
        );
        if self.known_series.contains_key(&series_key) {
            // The common case: one statement, atomic on its own. Each
            // statement is a round trip to the connection's thread, and that
            // is most of what an insert costs.
            return insert_instance(&self.writer, r).await;
        }
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        upsert_study_and_series(&mut tx, r).await?;
        let outcome = insert_instance(&mut *tx, r).await?;
        tx.commit().await?;
        self.known_series.insert(series_key, ());
        Ok(outcome)
    }

    async fn blob_resume_points(&self) -> Result<HashMap<String, u64>, MetaError> {
        let rows = sqlx::query("SELECT object, resume_at FROM blob_objects")
            .fetch_all(&self.reader)
            .await?;
        rows.into_iter()
            .map(|row| {
                let at: i64 = row.try_get(1)?;
                Ok((row.try_get(0)?, u64::try_from(at).unwrap_or(0)))
            })
            .collect()
    }

    async fn ping(&self) -> Result<(), MetaError> {
        sqlx::query("SELECT 1").execute(&self.reader).await?;
        Ok(())
    }
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}
