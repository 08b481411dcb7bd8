//! The embedded metadata store: a SQLite file in WAL mode.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqliteConnection, SqlitePool};

use super::query::{self, Level, Locate, Matcher, Search, SearchRow, StoredInstance};
use super::{
    AssertionLog, BlobLocation, IndexOutcome, IndexedBlob, InstanceRecord, MetaError, MetadataStore,
};
use crate::ids::{PartnerId, TransferId, Uid};

/// Remove a partner's study from the DICOM index, on `conn` (inside the
/// caller's transaction). Returns where its objects are, for the blob store
/// to discard after the commit, and the series it removed, whose
/// known-series cache entries are stale once the commit is done.
pub(super) async fn discard_study_on(
    conn: &mut SqliteConnection,
    partner: &PartnerId,
    study_uid: &Uid,
) -> Result<(Vec<BlobLocation>, Vec<String>), MetaError> {
    let rows = sqlx::query(
        "SELECT blob_object, blob_offset, blob_length FROM instances WHERE partner = ? AND study_uid = ?",
    )
    .bind(partner.as_str())
    .bind(study_uid.as_str())
    .fetch_all(&mut *conn)
    .await?;
    let locations = rows
        .iter()
        .map(blob_location)
        .collect::<Result<Vec<_>, _>>()?;
    let series: Vec<String> =
        sqlx::query_scalar("SELECT series_uid FROM series WHERE partner = ? AND study_uid = ?")
            .bind(partner.as_str())
            .bind(study_uid.as_str())
            .fetch_all(&mut *conn)
            .await?;
    for statement in [
        "DELETE FROM instance_metadata WHERE instance_id IN (SELECT id FROM instances WHERE partner = ? AND study_uid = ?)",
        "DELETE FROM instances WHERE partner = ? AND study_uid = ?",
        "DELETE FROM series WHERE partner = ? AND study_uid = ?",
        "DELETE FROM studies WHERE partner = ? AND study_uid = ?",
        "DELETE FROM study_arrivals WHERE partner = ? AND study_uid = ?",
    ] {
        sqlx::query(statement)
            .bind(partner.as_str())
            .bind(study_uid.as_str())
            .execute(&mut *conn)
            .await?;
    }
    Ok((locations, series))
}

/// A blob location from a row whose first three columns are object, offset
/// and length.
pub(super) fn blob_location(row: &sqlx::sqlite::SqliteRow) -> Result<BlobLocation, MetaError> {
    let offset: i64 = row.try_get(1)?;
    let length: i64 = row.try_get(2)?;
    Ok(BlobLocation {
        object: row.try_get(0)?,
        offset: u64::try_from(offset).unwrap_or(0),
        length: u64::try_from(length).unwrap_or(0),
    })
}

/// Schema migrations, applied in order at start-up.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "dicom index", include_str!("migrations/0001_index.sql")),
    (
        2,
        "dicomweb metadata",
        include_str!("migrations/0002_dicomweb.sql"),
    ),
    (
        3,
        "fhir resources",
        include_str!("migrations/0003_fhir.sql"),
    ),
    (
        4,
        "fhir exact string search",
        include_str!("migrations/0004_fhir_exact.sql"),
    ),
    (
        5,
        "notification outbox",
        include_str!("migrations/0005_outbox.sql"),
    ),
    (
        6,
        "study arrivals",
        include_str!("migrations/0006_study_arrivals.sql"),
    ),
    (
        7,
        "client assertions",
        include_str!("migrations/0007_client_assertions.sql"),
    ),
    (
        8,
        "blob discards",
        include_str!("migrations/0008_blob_discards.sql"),
    ),
    (
        9,
        "transfer audit",
        include_str!("migrations/0009_transfer_audit.sql"),
    ),
    (
        10,
        "transfers running",
        include_str!("migrations/0010_transfers_running.sql"),
    ),
];

/// The index in a SQLite file.
#[derive(Clone)]
pub struct SqliteStore {
    /// The single connection that writes.
    pub(super) writer: SqlitePool,
    /// Connections for queries.
    pub(super) reader: SqlitePool,
    pub(super) known_series: KnownSeries,
}

/// Series (with their study) known to have index rows, so recording another
/// instance of them skips two upserts. Bounded; losing it costs only those
/// upserts. A path that deletes series or studies must invalidate it.
pub(super) type KnownSeries = moka::sync::Cache<(String, String), ()>;

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
            .test_before_acquire(false)
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
            .test_before_acquire(false)
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

#[async_trait::async_trait]
impl AssertionLog for SqliteStore {
    async fn first_use(
        &self,
        client_id: &str,
        jti: &str,
        expires_ms: i64,
        now_ms: i64,
    ) -> Result<bool, MetaError> {
        let mut tx = self.writer.begin().await?;
        sqlx::query("DELETE FROM client_assertions WHERE expires_ms < ?")
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
        let inserted = sqlx::query(
            "INSERT INTO client_assertions (client_id, jti, expires_ms) VALUES (?, ?, ?) \
             ON CONFLICT DO NOTHING",
        )
        .bind(client_id)
        .bind(jti)
        .bind(expires_ms)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok(inserted == 1)
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
    // the subquery says conflict; triggers flag the other versions,
    // advance the blob store's recovery point and note the instance's
    // transfer until its audit record is stored.
    let inserted = sqlx::query(
        "INSERT INTO instances (partner, study_uid, series_uid, sop_instance_uid, sop_class_uid,
            transfer_syntax, instance_number, rows, columns, number_of_frames, received_at_ms,
            size, dataset_sha256, blob_object, blob_offset, blob_length, blob_resume_at,
            source, calling_ae, transfer_id, conflict)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19,
            ?20, EXISTS (SELECT 1 FROM instances WHERE partner = ?1 AND sop_instance_uid = ?4))
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
    .bind(r.transfer.map(crate::ids::TransferId::get))
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
            match insert_instance(&self.writer, r).await {
                // Another process (`konsil retention`) removed the series
                // since it was cached: create it again below.
                Err(MetaError::Query(sqlx::Error::Database(e))) if e.is_foreign_key_violation() => {
                    self.known_series.invalidate(&series_key);
                }
                outcome => return outcome,
            }
        }
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        upsert_study_and_series(&mut tx, r).await?;
        let outcome = insert_instance(&mut *tx, r).await?;
        tx.commit().await?;
        self.known_series.insert(series_key, ());
        Ok(outcome)
    }

    async fn withdraw_instance(&self, blob: &BlobLocation) -> Result<(), MetaError> {
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let row = sqlx::query(
            "DELETE FROM instances WHERE blob_object = ? AND blob_offset = ?
             RETURNING partner, series_uid, study_uid, sop_instance_uid",
        )
        .bind(&blob.object)
        .bind(to_i64(blob.offset))
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(row) = row {
            let (partner, series, study, sop_instance): (String, String, String, String) = (
                row.try_get(0)?,
                row.try_get(1)?,
                row.try_get(2)?,
                row.try_get(3)?,
            );
            // A version left alone under its SOP Instance UID is no longer
            // in conflict with anything. A series or study this instance
            // alone made goes with it.
            for (statement, uid) in [
                (
                    "UPDATE instances SET conflict = 0
                     WHERE partner = ?1 AND sop_instance_uid = ?2 AND conflict = 1
                     AND (SELECT COUNT(*) FROM instances WHERE partner = ?1 AND sop_instance_uid = ?2) = 1",
                    &sop_instance,
                ),
                (
                    "DELETE FROM series WHERE partner = ?1 AND series_uid = ?2
                     AND NOT EXISTS (SELECT 1 FROM instances WHERE partner = ?1 AND series_uid = ?2)",
                    &series,
                ),
                (
                    "DELETE FROM studies WHERE partner = ?1 AND study_uid = ?2
                     AND NOT EXISTS (SELECT 1 FROM series WHERE partner = ?1 AND study_uid = ?2)",
                    &study,
                ),
            ] {
                sqlx::query(statement)
                    .bind(&partner)
                    .bind(uid)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            self.known_series.invalidate(&(partner, series));
        }
        Ok(())
    }

    async fn last_instances(&self) -> Result<Vec<IndexedBlob>, MetaError> {
        // SQLite takes the bare columns from the row that holds the MAX().
        let rows = sqlx::query(
            "SELECT blob_object, MAX(blob_offset), blob_length, size, dataset_sha256
             FROM instances GROUP BY blob_object",
        )
        .fetch_all(&self.reader)
        .await?;
        rows.iter()
            .map(|row| {
                let size: i64 = row.try_get(3)?;
                let sha: String = row.try_get(4)?;
                let mut dataset_sha256 = [0u8; 32];
                hex::decode_to_slice(&sha, &mut dataset_sha256)
                    .map_err(|_| MetaError::Corrupt(format!("instance digest {sha:?}")))?;
                Ok(IndexedBlob {
                    location: blob_location(row)?,
                    dataset_size: u64::try_from(size).unwrap_or(0),
                    dataset_sha256,
                })
            })
            .collect()
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

    async fn pending_studies(&self, limit: u32) -> Result<Vec<(PartnerId, Uid, i64)>, MetaError> {
        let rows = sqlx::query("SELECT partner, study_uid, seq FROM study_arrivals LIMIT ?")
            .bind(i64::from(limit))
            .fetch_all(&self.reader)
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let partner: String = row.try_get(0)?;
            let uid: String = row.try_get(1)?;
            // Rows the index wrote itself; one that does not parse is skipped.
            if let (Ok(partner), Ok(uid)) = (PartnerId::parse(&partner), Uid::parse(&uid)) {
                out.push((partner, uid, row.try_get(2)?));
            }
        }
        Ok(out)
    }

    async fn pending_seq(
        &self,
        partner: &PartnerId,
        study_uid: &Uid,
    ) -> Result<Option<i64>, MetaError> {
        Ok(
            sqlx::query_scalar(
                "SELECT seq FROM study_arrivals WHERE partner = ? AND study_uid = ?",
            )
            .bind(partner.as_str())
            .bind(study_uid.as_str())
            .fetch_optional(&self.reader)
            .await?,
        )
    }

    async fn transfer_started(&self, transfer: TransferId) -> Result<(), MetaError> {
        sqlx::query(
            "INSERT INTO transfers_running (transfer_id, pid, started_ms) VALUES (?, ?, ?)",
        )
        .bind(transfer.get())
        .bind(i64::from(std::process::id()))
        .bind(chrono::Utc::now().timestamp_millis())
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn clear_pending_study(
        &self,
        partner: &PartnerId,
        study_uid: &Uid,
        seq: i64,
    ) -> Result<(), MetaError> {
        sqlx::query("DELETE FROM study_arrivals WHERE partner = ? AND study_uid = ? AND seq = ?")
            .bind(partner.as_str())
            .bind(study_uid.as_str())
            .bind(seq)
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    async fn search(&self, search: &Search) -> Result<Vec<SearchRow>, MetaError> {
        let width = search.columns().count();
        let rows = search_sql(search).build().fetch_all(&self.reader).await?;
        rows.into_iter()
            .map(|row| {
                let values = (0..width)
                    .map(|n| row.try_get::<Option<String>, _>(n))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(SearchRow { values })
            })
            .collect()
    }

    async fn locate(&self, locate: &Locate) -> Result<Vec<StoredInstance>, MetaError> {
        let mut sql = sqlx::QueryBuilder::new(
            "SELECT i.id, i.study_uid, i.series_uid, i.sop_instance_uid, i.sop_class_uid,
                i.transfer_syntax, i.received_at_ms, i.dataset_sha256, i.blob_object,
                i.blob_offset, i.blob_length
             FROM instances i WHERE ",
        );
        partner_scope(&mut sql, "i", &locate.partners);
        sql.push(" AND i.study_uid = ")
            .push_bind(locate.study_uid.as_str().to_owned());
        if let Some(series) = &locate.series_uid {
            sql.push(" AND i.series_uid = ")
                .push_bind(series.as_str().to_owned());
        }
        if let Some(sop) = &locate.sop_instance_uid {
            sql.push(" AND i.sop_instance_uid = ")
                .push_bind(sop.as_str().to_owned());
        }
        sql.push(" AND ").push(LATEST_VERSION);
        sql.push(" ORDER BY i.series_uid, i.instance_number, i.id");
        let rows = sql.build().fetch_all(&self.reader).await?;
        rows.into_iter().map(stored_instance).collect()
    }

    async fn cached_metadata(&self, ids: &[i64]) -> Result<HashMap<i64, String>, MetaError> {
        let mut found = HashMap::with_capacity(ids.len());
        // Bounded batches: SQLite limits the number of bound parameters.
        for batch in ids.chunks(500) {
            let mut sql = sqlx::QueryBuilder::new(
                "SELECT instance_id, json FROM instance_metadata WHERE instance_id IN (",
            );
            let mut list = sql.separated(", ");
            for id in batch {
                list.push_bind(*id);
            }
            sql.push(")");
            for row in sql.build().fetch_all(&self.reader).await? {
                found.insert(row.try_get(0)?, row.try_get(1)?);
            }
        }
        Ok(found)
    }

    async fn cache_metadata(&self, entries: &[(i64, String)]) -> Result<(), MetaError> {
        let mut tx = self.writer.begin().await?;
        for (id, json) in entries {
            sqlx::query(
                "INSERT INTO instance_metadata (instance_id, json) VALUES (?, ?)
                 ON CONFLICT (instance_id) DO NOTHING",
            )
            .bind(id)
            .bind(json)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

/// Of several versions kept under one SOP Instance UID (a conflict), only
/// the most recent is served.
const LATEST_VERSION: &str = "(i.conflict = 0 OR i.id = (SELECT max(y.id) FROM instances y
    WHERE y.partner = i.partner AND y.sop_instance_uid = i.sop_instance_uid))";

fn partner_scope(
    sql: &mut sqlx::QueryBuilder<'_, sqlx::Sqlite>,
    alias: &str,
    partners: &[PartnerId],
) {
    if partners.is_empty() {
        // Nobody's data.
        sql.push("0");
        return;
    }
    // An IN list on the leading column lets SQLite use the (partner, …)
    // indexes for staff searches across partners too.
    sql.push(format!("{alias}.partner IN ("));
    let mut list = sql.separated(", ");
    for p in partners {
        list.push_bind(p.as_str().to_owned());
    }
    sql.push(")");
}

/// The SQL of a search.
fn search_sql(search: &Search) -> sqlx::QueryBuilder<'static, sqlx::Sqlite> {
    let mut sql = sqlx::QueryBuilder::new("SELECT ");
    let mut select = sql.separated(", ");
    for column in search.columns() {
        select.push(column.sql);
    }
    let (from, driving) = match search.level {
        Level::Study => (" FROM studies s", "s"),
        Level::Series => (
            " FROM series r JOIN studies s ON s.partner = r.partner AND s.study_uid = r.study_uid",
            "r",
        ),
        Level::Instance => (
            " FROM instances i
              JOIN series r ON r.partner = i.partner AND r.series_uid = i.series_uid
              JOIN studies s ON s.partner = i.partner AND s.study_uid = i.study_uid",
            "i",
        ),
    };
    sql.push(from).push(" WHERE ");
    partner_scope(&mut sql, driving, &search.partners);
    if search.level == Level::Instance {
        sql.push(" AND ").push(LATEST_VERSION);
    }
    for condition in &search.conditions {
        let a = condition.attribute;
        sql.push(" AND ");
        if a.keyword == "ModalitiesInStudy" {
            sql.push(
                "EXISTS (SELECT 1 FROM series x WHERE x.partner = s.partner
                 AND x.study_uid = s.study_uid AND ",
            );
            push_match(&mut sql, "x.modality", a.vr, &condition.matcher);
            sql.push(")");
        } else {
            push_match(
                &mut sql,
                match_column(a, search.level),
                a.vr,
                &condition.matcher,
            );
        }
    }
    // Instances of one study or series in instance-number order; across
    // studies in arrival order, which needs no sort of the whole table.
    let within_study = search.conditions.iter().any(|c| {
        matches!(
            c.attribute.keyword,
            "StudyInstanceUID" | "SeriesInstanceUID"
        )
    });
    sql.push(match search.level {
        Level::Study => " ORDER BY s.rowid",
        Level::Series => " ORDER BY r.series_number, r.rowid",
        Level::Instance if within_study => " ORDER BY i.instance_number, i.id",
        Level::Instance => " ORDER BY i.id",
    });
    sql.push(" LIMIT ").push_bind(i64::from(search.limit));
    sql.push(" OFFSET ").push_bind(i64::from(search.offset));
    sql
}

/// Where to match a UID: on the most specific table of the search, so the
/// (partner, study_uid) and (partner, series_uid) indexes drive the query.
fn match_column(a: &query::Attribute, level: Level) -> &'static str {
    match (a.keyword, level) {
        ("StudyInstanceUID", Level::Series) => "r.study_uid",
        ("StudyInstanceUID", Level::Instance) => "i.study_uid",
        ("SeriesInstanceUID", Level::Instance) => "i.series_uid",
        ("SeriesNumber", _) => "r.series_number",
        ("InstanceNumber", _) => "i.instance_number",
        ("NumberOfFrames", _) => "i.number_of_frames",
        ("Rows", _) => "i.rows",
        ("Columns", _) => "i.columns",
        _ => a.sql,
    }
}

fn push_match(
    sql: &mut sqlx::QueryBuilder<'static, sqlx::Sqlite>,
    column: &str,
    vr: dicom_core::VR,
    matcher: &Matcher,
) {
    use dicom_core::VR;
    let person_name = vr == VR::PN;
    match matcher {
        Matcher::Exact(v) if matches!(vr, VR::IS | VR::US) => {
            sql.push(column)
                .push(" = ")
                .push_bind(v.parse::<i64>().unwrap_or(i64::MIN));
        }
        // Person names match case-insensitively (PS3.18 8.3.4.1); LIKE is
        // case-insensitive for ASCII.
        Matcher::Exact(v) if person_name => {
            sql.push(column)
                .push(" LIKE ")
                .push_bind(query::like_literal(v))
                .push(" ESCAPE '\\'");
        }
        Matcher::Exact(v) => {
            sql.push(column).push(" = ").push_bind(v.clone());
        }
        Matcher::Wildcard(v) if person_name => {
            sql.push(column)
                .push(" LIKE ")
                .push_bind(query::like_pattern(v))
                .push(" ESCAPE '\\'");
        }
        Matcher::Wildcard(v) => {
            sql.push(column)
                .push(" GLOB ")
                .push_bind(query::glob_pattern(v));
        }
        Matcher::AnyOf(values) => {
            sql.push(column).push(" IN (");
            let mut list = sql.separated(", ");
            for v in values {
                list.push_bind(v.clone());
            }
            sql.push(")");
        }
        Matcher::Range(low, high) => {
            sql.push("(1");
            if let Some(low) = low {
                sql.push(" AND ")
                    .push(column)
                    .push(" >= ")
                    .push_bind(low.clone());
            }
            if let Some(high) = high {
                // Compare only as many characters as the bound has, so a
                // time bound "1200" includes "120000.5".
                sql.push(format!(" AND substr({column}, 1, "))
                    .push_bind(high.len() as i64)
                    .push(") <= ")
                    .push_bind(high.clone());
            }
            sql.push(")");
        }
        Matcher::Fuzzy(v) => {
            // Any name component (family, given, …; words within them)
            // starting with the value.
            let start = format!("{}%", query::like_literal(v));
            sql.push("(")
                .push(column)
                .push(" LIKE ")
                .push_bind(start.clone())
                .push(" ESCAPE '\\'");
            for separator in ["^", " ", "="] {
                sql.push(" OR ")
                    .push(column)
                    .push(" LIKE ")
                    .push_bind(format!("%{}{start}", query::like_literal(separator)))
                    .push(" ESCAPE '\\'");
            }
            sql.push(")");
        }
    }
}

fn stored_instance(row: sqlx::sqlite::SqliteRow) -> Result<StoredInstance, MetaError> {
    let uid = |n: usize| -> Result<Uid, MetaError> {
        let raw: String = row.try_get(n)?;
        Uid::parse(&raw).map_err(|e| MetaError::Corrupt(e.to_string()))
    };
    let unsigned = |n: usize| -> Result<u64, MetaError> {
        let v: i64 = row.try_get(n)?;
        u64::try_from(v).map_err(|_| MetaError::Corrupt(format!("negative blob offset {v}")))
    };
    Ok(StoredInstance {
        id: row.try_get(0)?,
        study_uid: uid(1)?,
        series_uid: uid(2)?,
        sop_instance_uid: uid(3)?,
        sop_class_uid: uid(4)?,
        transfer_syntax: uid(5)?,
        received_at_ms: row.try_get(6)?,
        dataset_sha256: row.try_get(7)?,
        blob: BlobLocation {
            object: row.try_get(8)?,
            offset: unsigned(9)?,
            length: unsigned(10)?,
        },
    })
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}
