//! [`ResourceStore`] on the embedded SQLite file (tables of migration 0003).

use sqlx::sqlite::SqliteRow;
use sqlx::{QueryBuilder, Row, Sqlite, SqliteConnection};

use super::fhir::{
    Attempt, Clause, Cursor, DatePrefix, HistoryPage, HistoryQuery, Notification, ResourcePage,
    ResourceQuery, ResourceStore, ResourceTx, ResourceWrite, Sort, StoredResource, StringMatch,
};
use super::sqlite::{discard_study_on, KnownSeries, SqliteStore};
use super::{BlobKind, BlobLocation, MetaError, PendingDiscard, UnauditedTransfer};
use crate::ids::{PartnerId, TransferId, Uid};

/// Sort key of rows without a value for a date sort: after all others.
const LAST: i64 = i64::MAX;

const COLUMNS: &str = "r.rid, r.type, r.id, r.version, r.last_updated, r.updated_ms, r.partner, r.body, r.deleted, r.blob_object, r.blob_offset, r.blob_length";

fn stored(row: &SqliteRow, method: Option<String>) -> Result<StoredResource, MetaError> {
    let partner: Option<String> = row.try_get("partner")?;
    let partner = partner
        .map(|p| PartnerId::parse(&p).map_err(|e| MetaError::Corrupt(e.to_string())))
        .transpose()?;
    Ok(StoredResource {
        resource_type: row.try_get("type")?,
        id: row.try_get("id")?,
        version: row.try_get("version")?,
        last_updated: row.try_get("last_updated")?,
        updated_ms: row.try_get("updated_ms")?,
        partner,
        body: row.try_get("body")?,
        method: method.unwrap_or_default(),
        blob: blob_of(row)?,
    })
}

fn blob_of(row: &SqliteRow) -> Result<Option<BlobLocation>, MetaError> {
    let object: Option<String> = row.try_get("blob_object")?;
    let Some(object) = object else {
        return Ok(None);
    };
    let offset: i64 = row.try_get("blob_offset")?;
    let length: i64 = row.try_get("blob_length")?;
    let bad = |_| MetaError::Corrupt(format!("negative blob range in {object}"));
    Ok(Some(BlobLocation {
        offset: u64::try_from(offset).map_err(bad)?,
        length: u64::try_from(length).map_err(bad)?,
        object,
    }))
}

async fn current_on(
    conn: &mut SqliteConnection,
    resource_type: &str,
    id: &str,
) -> Result<Option<StoredResource>, MetaError> {
    let row = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM fhir_resource r WHERE r.type = ? AND r.id = ?"
    ))
    .bind(resource_type)
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?;
    row.map(|r| stored(&r, None)).transpose()
}

fn push_date_condition(
    qb: &mut QueryBuilder<'_, Sqlite>,
    low: &str,
    high: &str,
    (prefix, ql, qh): (DatePrefix, i64, i64),
) {
    let cmp = |qb: &mut QueryBuilder<'_, Sqlite>, column: &str, op: &str, value: i64| {
        qb.push(format!("{column} {op} "));
        qb.push_bind(value);
    };
    qb.push("(");
    match prefix {
        DatePrefix::Eq | DatePrefix::Ne => {
            if prefix == DatePrefix::Ne {
                qb.push("NOT (");
            }
            cmp(qb, low, ">=", ql);
            qb.push(" AND ");
            cmp(qb, high, "<=", qh);
            if prefix == DatePrefix::Ne {
                qb.push(")");
            }
        }
        DatePrefix::Gt => cmp(qb, high, ">", qh),
        DatePrefix::Lt => cmp(qb, low, "<", ql),
        DatePrefix::Ge => cmp(qb, high, ">=", ql),
        DatePrefix::Le => cmp(qb, low, "<=", qh),
        DatePrefix::Sa => cmp(qb, low, ">", qh),
        DatePrefix::Eb => cmp(qb, high, "<", ql),
        DatePrefix::Ap => {
            cmp(qb, low, "<=", qh);
            qb.push(" AND ");
            cmp(qb, high, ">=", ql);
        }
    }
    qb.push(")");
}

fn push_or<T>(
    qb: &mut QueryBuilder<'_, Sqlite>,
    items: &[T],
    mut each: impl FnMut(&mut QueryBuilder<'_, Sqlite>, &T),
) {
    qb.push("(");
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            qb.push(" OR ");
        }
        each(qb, item);
    }
    if items.is_empty() {
        qb.push("0");
    }
    qb.push(")");
}

/// `AND r.partner IN (...)` when the caller sees only some partners.
fn push_partners<'a>(qb: &mut QueryBuilder<'a, Sqlite>, partners: Option<&'a [PartnerId]>) {
    let Some(partners) = partners else {
        return;
    };
    qb.push(" AND r.partner IN (");
    let mut list = qb.separated(", ");
    for p in partners {
        list.push_bind(p.as_str());
    }
    if partners.is_empty() {
        list.push("NULL");
    }
    qb.push(")");
}

/// How likely a clause is to narrow the search, lowest first: the first
/// index clause drives the query (`rid IN (...)`), the others are checked
/// per candidate (`EXISTS`).
fn selectivity(clause: &Clause) -> u8 {
    match clause {
        Clause::Ids(_) => 0,
        Clause::Token { .. } | Clause::Reference { .. } => 1,
        Clause::String { .. } => 2,
        Clause::Date { .. } => 3,
        Clause::LastUpdated(_) | Clause::Missing { .. } => 4,
    }
}

/// A condition on one of the index tables, for resource `r`: as the query's
/// driver (`r.rid IN (SELECT rid ...)`) or as a check (`EXISTS (...)`).
fn push_index_clause<'a>(
    qb: &mut QueryBuilder<'a, Sqlite>,
    table: &str,
    param: &str,
    driver: bool,
    condition: impl FnOnce(&mut QueryBuilder<'a, Sqlite>),
) {
    if driver {
        qb.push(format!(
            "r.rid IN (SELECT x.rid FROM {table} x WHERE x.param = "
        ));
    } else {
        qb.push(format!(
            "EXISTS (SELECT 1 FROM {table} x WHERE x.rid = r.rid AND x.param = "
        ));
    }
    qb.push_bind(param.to_owned());
    qb.push(" AND ");
    condition(qb);
    qb.push(")");
}

/// The WHERE conditions of a search (without paging).
fn push_filters<'a>(qb: &mut QueryBuilder<'a, Sqlite>, q: &'a ResourceQuery) {
    let mut clauses: Vec<&Clause> = q.clauses.iter().collect();
    clauses.sort_by_key(|c| selectivity(c));
    // With an index clause to drive the query, keep SQLite from scanning the
    // type's rows instead (unary + hides the type index).
    let driven = clauses
        .first()
        .is_some_and(|c| matches!(selectivity(c), 1..=3));
    qb.push(if driven {
        " WHERE +r.type = "
    } else {
        " WHERE r.type = "
    });
    qb.push_bind(q.resource_type.as_str());
    qb.push(" AND r.deleted = 0");
    push_partners(qb, q.partners.as_deref());
    for (n, clause) in clauses.into_iter().enumerate() {
        let driver = driven && n == 0;
        qb.push(" AND ");
        match clause {
            Clause::Ids(ids) => push_or(qb, ids, |qb, id| {
                qb.push("r.id = ");
                qb.push_bind(id.clone());
            }),
            Clause::LastUpdated(values) => push_or(qb, values, |qb, v| {
                push_date_condition(qb, "r.updated_ms", "r.updated_ms", *v)
            }),
            Clause::Token { param, values } => {
                push_index_clause(qb, "fhir_token", param, driver, |qb| {
                    push_or(qb, values, |qb, (system, code)| {
                        qb.push("(1");
                        if let Some(code) = code {
                            qb.push(" AND x.code = ");
                            qb.push_bind(code.clone());
                        }
                        if let Some(system) = system {
                            qb.push(" AND x.system = ");
                            qb.push_bind(system.clone());
                        }
                        qb.push(")");
                    })
                });
            }
            Clause::Reference { param, targets } => {
                push_index_clause(qb, "fhir_reference", param, driver, |qb| {
                    push_or(qb, targets, |qb, t| {
                        qb.push("x.target = ");
                        qb.push_bind(t.clone());
                    })
                });
            }
            Clause::Date { param, values } => {
                push_index_clause(qb, "fhir_date", param, driver, |qb| {
                    push_or(qb, values, |qb, v| {
                        push_date_condition(qb, "x.low", "x.high", *v)
                    })
                });
            }
            Clause::String {
                param,
                mode,
                values,
            } => {
                push_index_clause(qb, "fhir_string", param, driver, |qb| {
                    push_or(qb, values, |qb, v| match mode {
                        StringMatch::Exact => {
                            qb.push("x.exact = ");
                            qb.push_bind(v.clone());
                        }
                        StringMatch::Prefix => {
                            // Values are stored lower-cased; U+10FFFF sorts
                            // after every other character.
                            qb.push("(x.value >= ");
                            qb.push_bind(v.clone());
                            qb.push(" AND x.value < ");
                            qb.push_bind(format!("{v}\u{10FFFF}"));
                            qb.push(")");
                        }
                        StringMatch::Contains => {
                            qb.push("instr(x.value, ");
                            qb.push_bind(v.clone());
                            qb.push(") > 0");
                        }
                    })
                });
            }
            Clause::Missing { param, missing } => {
                // The parameter's entries live in one of the four tables.
                qb.push(if *missing { "NOT (" } else { "(" });
                for (i, table) in ["fhir_token", "fhir_reference", "fhir_date", "fhir_string"]
                    .into_iter()
                    .enumerate()
                {
                    if i > 0 {
                        qb.push(" OR ");
                    }
                    qb.push(format!(
                        "EXISTS (SELECT 1 FROM {table} x WHERE x.rid = r.rid AND x.param = "
                    ));
                    qb.push_bind(param.clone());
                    qb.push(")");
                }
                qb.push(")");
            }
        }
    }
}

fn push_sort_key<'a>(qb: &mut QueryBuilder<'a, Sqlite>, sort: &'a Sort) {
    match sort {
        Sort::Created => {
            qb.push("0");
        }
        Sort::LastUpdated { descending: false } => {
            qb.push("r.updated_ms");
        }
        Sort::LastUpdated { descending: true } => {
            qb.push("-r.updated_ms");
        }
        Sort::Date { param, descending } => {
            let (agg, sign) = if *descending {
                ("max(high)", "-")
            } else {
                ("min(low)", "")
            };
            qb.push(format!(
                "COALESCE({sign}(SELECT {agg} FROM fhir_date d WHERE d.rid = r.rid AND d.param = "
            ));
            qb.push_bind(param.as_str());
            qb.push(format!("), {LAST})"));
        }
    }
}

async fn search_on(
    conn: &mut SqliteConnection,
    q: &ResourceQuery,
) -> Result<ResourcePage, MetaError> {
    let total = if q.want_total || q.count == 0 {
        let mut qb = QueryBuilder::<Sqlite>::new("SELECT count(*) FROM fhir_resource r");
        push_filters(&mut qb, q);
        let n: i64 = qb.build().fetch_one(&mut *conn).await?.try_get(0)?;
        Some(u64::try_from(n).unwrap_or(0))
    } else {
        None
    };
    if q.count == 0 {
        return Ok(ResourcePage {
            total,
            ..ResourcePage::default()
        });
    }
    let mut qb = QueryBuilder::<Sqlite>::new(format!("SELECT * FROM (SELECT {COLUMNS}, "));
    push_sort_key(&mut qb, &q.sort);
    qb.push(" AS k FROM fhir_resource r");
    push_filters(&mut qb, q);
    qb.push(")");
    if let Some(after) = q.after {
        qb.push(" WHERE (k, rid) > (");
        qb.push_bind(after.key);
        qb.push(", ");
        qb.push_bind(after.row);
        qb.push(")");
    }
    qb.push(" ORDER BY k, rid LIMIT ");
    qb.push_bind(i64::try_from(q.count + 1).unwrap_or(i64::MAX));
    let rows = qb.build().fetch_all(&mut *conn).await?;
    let mut resources = Vec::with_capacity(rows.len().min(q.count));
    let mut next = None;
    for (i, row) in rows.iter().enumerate() {
        if i == q.count {
            let last = &rows[i - 1];
            next = Some(Cursor {
                key: last.try_get("k")?,
                row: last.try_get("rid")?,
            });
            break;
        }
        resources.push(stored(row, None)?);
    }
    Ok(ResourcePage {
        resources,
        total,
        next,
    })
}

#[async_trait::async_trait]
impl ResourceStore for SqliteStore {
    async fn pending_discards(&self, limit: u32) -> Result<Vec<PendingDiscard>, MetaError> {
        let rows = sqlx::query(
            "SELECT object, offset, length, id, store FROM blob_discards ORDER BY id LIMIT ?",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?;
        rows.iter()
            .map(|row| {
                let store: String = row.try_get(4)?;
                let kind = match store.as_str() {
                    "dicom" => BlobKind::Dicom,
                    "fhir" => BlobKind::Fhir,
                    other => {
                        return Err(MetaError::Corrupt(format!(
                            "blob_discards.store is '{other}'"
                        )))
                    }
                };
                Ok(PendingDiscard {
                    id: row.try_get(3)?,
                    kind,
                    location: super::sqlite::blob_location(row)?,
                })
            })
            .collect()
    }

    async fn forget_discard(&self, id: i64) -> Result<(), MetaError> {
        sqlx::query("DELETE FROM blob_discards WHERE id = ?")
            .bind(id)
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    async fn current(
        &self,
        resource_type: &str,
        id: &str,
    ) -> Result<Option<StoredResource>, MetaError> {
        let mut conn = self.reader.acquire().await?;
        current_on(&mut conn, resource_type, id).await
    }

    async fn version(
        &self,
        resource_type: &str,
        id: &str,
        version: i64,
    ) -> Result<Option<StoredResource>, MetaError> {
        let row = sqlx::query(
            "SELECT r.type, r.id, h.version, h.last_updated, h.updated_ms, r.partner, h.body, h.method,
                h.blob_object, h.blob_offset, h.blob_length
             FROM fhir_resource r JOIN fhir_history h ON h.rid = r.rid
             WHERE r.type = ? AND r.id = ? AND h.version = ?",
        )
        .bind(resource_type)
        .bind(id)
        .bind(version)
        .fetch_optional(&self.reader)
        .await?;
        row.map(|r| {
            let method = r.try_get("method")?;
            stored(&r, Some(method))
        })
        .transpose()
    }

    async fn current_many(
        &self,
        keys: &[(String, String)],
    ) -> Result<Vec<StoredResource>, MetaError> {
        let mut out = Vec::with_capacity(keys.len());
        // SQLite caps bound parameters per statement: ask in slices.
        for chunk in keys.chunks(400) {
            let mut qb = QueryBuilder::<Sqlite>::new(format!(
                "SELECT {COLUMNS} FROM fhir_resource r WHERE r.deleted = 0 AND (r.type, r.id) IN (VALUES "
            ));
            let mut list = qb.separated(", ");
            for (t, id) in chunk {
                list.push("(");
                list.push_bind_unseparated(t.as_str());
                list.push_unseparated(", ");
                list.push_bind_unseparated(id.as_str());
                list.push_unseparated(")");
            }
            qb.push(")");
            for row in qb.build().fetch_all(&self.reader).await? {
                out.push(stored(&row, None)?);
            }
        }
        Ok(out)
    }

    async fn search(&self, query: &ResourceQuery) -> Result<ResourcePage, MetaError> {
        let mut conn = self.reader.acquire().await?;
        search_on(&mut conn, query).await
    }

    async fn history(&self, q: &HistoryQuery) -> Result<HistoryPage, MetaError> {
        let mut qb = QueryBuilder::<Sqlite>::new(
            "SELECT h.hid, r.type, r.id, h.version, h.last_updated, h.updated_ms, r.partner, h.body, h.method,
                h.blob_object, h.blob_offset, h.blob_length
             FROM fhir_history h JOIN fhir_resource r ON r.rid = h.rid WHERE 1",
        );
        if let Some(t) = &q.resource_type {
            qb.push(" AND r.type = ");
            qb.push_bind(t.as_str());
        }
        if let Some(id) = &q.id {
            qb.push(" AND r.id = ");
            qb.push_bind(id.as_str());
        }
        push_partners(&mut qb, q.partners.as_deref());
        if let Some(since) = q.since_ms {
            qb.push(" AND h.updated_ms >= ");
            qb.push_bind(since);
        }
        if let Some(before) = q.before_row {
            qb.push(" AND h.hid < ");
            qb.push_bind(before);
        }
        qb.push(" ORDER BY h.hid DESC LIMIT ");
        qb.push_bind(i64::try_from(q.count + 1).unwrap_or(i64::MAX));
        let rows = qb.build().fetch_all(&self.reader).await?;
        let mut page = HistoryPage::default();
        for (i, row) in rows.iter().enumerate() {
            if i == q.count {
                page.next = Some(rows[i - 1].try_get("hid")?);
                break;
            }
            let method = row.try_get("method")?;
            page.versions.push(stored(row, Some(method))?);
        }
        Ok(page)
    }

    async fn binary_resume_points(
        &self,
    ) -> Result<std::collections::HashMap<String, u64>, MetaError> {
        let rows = sqlx::query(
            "SELECT blob_object, max(blob_resume_at) FROM fhir_history
             WHERE blob_object IS NOT NULL GROUP BY blob_object",
        )
        .fetch_all(&self.reader)
        .await?;
        rows.iter()
            .map(|row| {
                let object: String = row.try_get(0)?;
                let at: Option<i64> = row.try_get(1)?;
                Ok((object, u64::try_from(at.unwrap_or(0)).unwrap_or(0)))
            })
            .collect()
    }

    async fn begin(&self) -> Result<Box<dyn ResourceTx>, MetaError> {
        let tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        Ok(Box::new(SqliteResourceTx {
            tx,
            known_series: self.known_series.clone(),
            removed_series: Vec::new(),
        }))
    }

    async fn due_notifications(
        &self,
        now_ms: i64,
        limit: u32,
    ) -> Result<Vec<Notification>, MetaError> {
        let rows = sqlx::query(
            "SELECT id, subscription_id, focus, created_ms, attempts FROM notification_outbox
             WHERE state = 'pending' AND next_attempt_ms <= ? ORDER BY next_attempt_ms, id LIMIT ?",
        )
        .bind(now_ms)
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?;
        rows.iter()
            .map(|row| {
                let attempts: i64 = row.try_get("attempts")?;
                Ok(Notification {
                    id: row.try_get("id")?,
                    subscription_id: row.try_get("subscription_id")?,
                    focus: row.try_get("focus")?,
                    created_ms: row.try_get("created_ms")?,
                    attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
                })
            })
            .collect()
    }

    async fn record_attempt(&self, id: i64, attempt: &Attempt) -> Result<(), MetaError> {
        let (state, next, error) = match attempt {
            Attempt::Delivered => ("delivered", None, None),
            Attempt::Retry { next_ms, error } => ("pending", Some(*next_ms), Some(error.as_str())),
            Attempt::Abandoned { error } => ("abandoned", None, Some(error.as_str())),
        };
        sqlx::query(
            "UPDATE notification_outbox SET state = ?, attempts = attempts + 1,
                next_attempt_ms = coalesce(?, next_attempt_ms), last_error = ?
             WHERE id = ?",
        )
        .bind(state)
        .bind(next)
        .bind(error)
        .bind(id)
        .execute(&self.writer)
        .await?;
        Ok(())
    }
}

struct SqliteResourceTx {
    tx: sqlx::Transaction<'static, Sqlite>,
    /// The index's cache of series rows that exist.
    known_series: KnownSeries,
    /// (partner, series) rows this transaction removed: stale in the cache
    /// once it commits.
    removed_series: Vec<(String, String)>,
}

#[async_trait::async_trait]
impl ResourceTx for SqliteResourceTx {
    async fn current(
        &mut self,
        resource_type: &str,
        id: &str,
    ) -> Result<Option<StoredResource>, MetaError> {
        current_on(&mut self.tx, resource_type, id).await
    }

    async fn search(&mut self, query: &ResourceQuery) -> Result<ResourcePage, MetaError> {
        search_on(&mut self.tx, query).await
    }

    async fn write(&mut self, w: &ResourceWrite) -> Result<(), MetaError> {
        let r = &w.resource;
        let deleted = r.body.is_none();
        let rid: i64 = sqlx::query(
            "INSERT INTO fhir_resource (type, id, version, partner, last_updated, updated_ms, deleted, body,
                blob_object, blob_offset, blob_length)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
             ON CONFLICT (type, id) DO UPDATE SET version = excluded.version,
                partner = excluded.partner, last_updated = excluded.last_updated,
                updated_ms = excluded.updated_ms, deleted = excluded.deleted, body = excluded.body,
                blob_object = excluded.blob_object, blob_offset = excluded.blob_offset,
                blob_length = excluded.blob_length
             RETURNING rid",
        )
        .bind(&r.resource_type)
        .bind(&r.id)
        .bind(r.version)
        .bind(r.partner.as_ref().map(|p| p.as_str()))
        .bind(&r.last_updated)
        .bind(r.updated_ms)
        .bind(deleted)
        .bind(&r.body)
        .bind(r.blob.as_ref().map(|b| b.object.as_str()))
        .bind(r.blob.as_ref().map(|b| to_i64(b.offset)))
        .bind(r.blob.as_ref().map(|b| to_i64(b.length)))
        .fetch_one(&mut *self.tx)
        .await?
        .try_get(0)?;
        sqlx::query(
            "INSERT INTO fhir_history (rid, version, last_updated, updated_ms, method, body,
                blob_object, blob_offset, blob_length, blob_resume_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(rid)
        .bind(r.version)
        .bind(&r.last_updated)
        .bind(r.updated_ms)
        .bind(&r.method)
        .bind(&r.body)
        .bind(r.blob.as_ref().map(|b| b.object.as_str()))
        .bind(r.blob.as_ref().map(|b| to_i64(b.offset)))
        .bind(r.blob.as_ref().map(|b| to_i64(b.length)))
        .bind(w.blob_resume_at.map(to_i64))
        .execute(&mut *self.tx)
        .await?;
        if r.version > 1 {
            for table in ["fhir_token", "fhir_reference", "fhir_date", "fhir_string"] {
                sqlx::query(&format!("DELETE FROM {table} WHERE rid = ?"))
                    .bind(rid)
                    .execute(&mut *self.tx)
                    .await?;
            }
        }
        let ix = &w.index;
        // Batched inserts, in slices under SQLite's bound-parameter cap.
        for chunk in ix.tokens.chunks(200) {
            let mut qb =
                QueryBuilder::<Sqlite>::new("INSERT INTO fhir_token (rid, param, system, code) ");
            qb.push_values(chunk, |mut b, (param, system, code)| {
                b.push_bind(rid)
                    .push_bind(param)
                    .push_bind(system)
                    .push_bind(code);
            });
            qb.build().execute(&mut *self.tx).await?;
        }
        for chunk in ix.references.chunks(300) {
            let mut qb =
                QueryBuilder::<Sqlite>::new("INSERT INTO fhir_reference (rid, param, target) ");
            qb.push_values(chunk, |mut b, (param, target)| {
                b.push_bind(rid).push_bind(param).push_bind(target);
            });
            qb.build().execute(&mut *self.tx).await?;
        }
        for chunk in ix.dates.chunks(200) {
            let mut qb =
                QueryBuilder::<Sqlite>::new("INSERT INTO fhir_date (rid, param, low, high) ");
            qb.push_values(chunk, |mut b, (param, low, high)| {
                b.push_bind(rid)
                    .push_bind(param)
                    .push_bind(*low)
                    .push_bind(*high);
            });
            qb.build().execute(&mut *self.tx).await?;
        }
        for chunk in ix.strings.chunks(300) {
            let mut qb =
                QueryBuilder::<Sqlite>::new("INSERT INTO fhir_string (rid, param, value, exact) ");
            qb.push_values(chunk, |mut b, (param, value, exact)| {
                b.push_bind(rid)
                    .push_bind(param)
                    .push_bind(value)
                    .push_bind(exact);
            });
            qb.build().execute(&mut *self.tx).await?;
        }
        Ok(())
    }

    async fn purge_history(
        &mut self,
        resource_type: &str,
        id: &str,
        below_version: i64,
    ) -> Result<Vec<BlobLocation>, MetaError> {
        let rows = sqlx::query(
            "SELECT h.blob_object, h.blob_offset, h.blob_length FROM fhir_history h
             JOIN fhir_resource r ON r.rid = h.rid
             WHERE r.type = ? AND r.id = ? AND h.version < ? AND h.blob_object IS NOT NULL",
        )
        .bind(resource_type)
        .bind(id)
        .bind(below_version)
        .fetch_all(&mut *self.tx)
        .await?;
        let mut blobs = rows
            .iter()
            .map(super::sqlite::blob_location)
            .collect::<Result<Vec<_>, _>>()?;
        blobs.dedup();
        sqlx::query(
            "UPDATE fhir_history SET body = NULL, blob_object = NULL, blob_offset = NULL,
                blob_length = NULL
             WHERE version < ? AND rid = (SELECT rid FROM fhir_resource WHERE type = ? AND id = ?)",
        )
        .bind(below_version)
        .bind(resource_type)
        .bind(id)
        .execute(&mut *self.tx)
        .await?;
        Ok(blobs)
    }

    async fn enqueue_notification(
        &mut self,
        subscription_id: &str,
        focus: &str,
        now_ms: i64,
    ) -> Result<(), MetaError> {
        sqlx::query(
            "INSERT INTO notification_outbox (subscription_id, focus, created_ms, next_attempt_ms)
             VALUES (?, ?, ?, ?)",
        )
        .bind(subscription_id)
        .bind(focus)
        .bind(now_ms)
        .bind(now_ms)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    async fn take_unaudited_transfers(
        &mut self,
        transfer: Option<TransferId>,
    ) -> Result<Vec<UnauditedTransfer>, MetaError> {
        if transfer.is_none() {
            // Transfers of processes that are gone are anybody's now; a
            // living one's (an import next to this server) stay its own.
            let running: Vec<(i64, i64)> =
                sqlx::query_as("SELECT transfer_id, pid FROM transfers_running")
                    .fetch_all(&mut *self.tx)
                    .await?;
            for (running, pid) in running {
                let alive = u32::try_from(pid).is_ok_and(crate::store::process_alive);
                if !alive {
                    sqlx::query("DELETE FROM transfers_running WHERE transfer_id = ?")
                        .bind(running)
                        .execute(&mut *self.tx)
                        .await?;
                }
            }
        }
        let rows = sqlx::query(
            "DELETE FROM transfers_unaudited
             WHERE (?1 IS NULL AND transfer_id NOT IN (SELECT transfer_id FROM transfers_running))
                OR transfer_id = ?1
             RETURNING transfer_id, partner, study_uid, source, calling_ae, instances,
                first_ms, last_ms",
        )
        .bind(transfer.map(TransferId::get))
        .fetch_all(&mut *self.tx)
        .await?;
        if let Some(transfer) = transfer {
            sqlx::query("DELETE FROM transfers_running WHERE transfer_id = ?")
                .bind(transfer.get())
                .execute(&mut *self.tx)
                .await?;
        }
        let mut taken = rows
            .iter()
            .map(|row| {
                Ok(UnauditedTransfer {
                    transfer: TransferId::from_stored(row.try_get("transfer_id")?),
                    partner: row.try_get("partner")?,
                    study_uid: row.try_get("study_uid")?,
                    source: row.try_get("source")?,
                    calling_ae: row.try_get("calling_ae")?,
                    instances: u64::try_from(row.try_get::<i64, _>("instances")?).unwrap_or(0),
                    first_ms: row.try_get("first_ms")?,
                    last_ms: row.try_get("last_ms")?,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        // RETURNING gives no order.
        taken.sort_by(|a, b| {
            (a.transfer, &a.partner, a.first_ms, &a.study_uid).cmp(&(
                b.transfer,
                &b.partner,
                b.first_ms,
                &b.study_uid,
            ))
        });
        Ok(taken)
    }

    async fn queue_discards(
        &mut self,
        kind: BlobKind,
        locations: &[BlobLocation],
    ) -> Result<(), MetaError> {
        for location in locations {
            sqlx::query(
                "INSERT INTO blob_discards (store, object, offset, length) VALUES (?, ?, ?, ?)",
            )
            .bind(kind.as_str())
            .bind(&location.object)
            .bind(to_i64(location.offset))
            .bind(to_i64(location.length))
            .execute(&mut *self.tx)
            .await?;
        }
        Ok(())
    }

    async fn discard_study(
        &mut self,
        partner: &PartnerId,
        study_uid: &Uid,
    ) -> Result<Vec<BlobLocation>, MetaError> {
        let (locations, series) = discard_study_on(&mut self.tx, partner, study_uid).await?;
        self.removed_series
            .extend(series.into_iter().map(|s| (partner.as_str().to_owned(), s)));
        Ok(locations)
    }

    async fn commit(self: Box<Self>) -> Result<(), MetaError> {
        let this = *self;
        this.tx.commit().await?;
        // A later instance of a removed series must create its row again.
        for key in &this.removed_series {
            this.known_series.invalidate(key);
        }
        Ok(())
    }
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}
