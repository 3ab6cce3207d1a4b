//! The store under test, SQLite or PostgreSQL, and one way to query either: store
//! tests run the same body against both (`on_both_stores!`).

use serde_json::{json, Value};

use super::postgres::{postgres_or_skip, Postgres};
use super::TempDir;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Sqlite,
    Postgres,
}

/// A fresh, empty store: a file in its own directory, or a server of its own.
pub struct TestStore {
    pub kind: Kind,
    pub dir: TempDir,
    pub pg: Option<Postgres>,
}

impl TestStore {
    /// `None` when PostgreSQL is not installed (outside CI): the test is skipped.
    pub fn new(kind: Kind, tag: &str) -> Option<TestStore> {
        let dir = TempDir::new(tag);
        let pg = match kind {
            Kind::Sqlite => None,
            Kind::Postgres => Some(postgres_or_skip()?),
        };
        Some(TestStore { kind, dir, pg })
    }

    pub fn path(&self) -> std::path::PathBuf {
        self.dir.path().join("cascade.db")
    }

    pub fn url(&self) -> String {
        self.pg.as_ref().expect("a PostgreSQL store").url()
    }

    /// The `store:` keys that point at it (inside `{ ... }`).
    pub fn yaml(&self) -> String {
        match self.kind {
            Kind::Sqlite => format!("path: \"{}\"", self.path().display()),
            Kind::Postgres => format!("url: \"{}\"", self.url()),
        }
    }

    pub fn backend(&self) -> cascade::store::Backend {
        match self.kind {
            Kind::Sqlite => cascade::store::Backend::Sqlite(self.path()),
            Kind::Postgres => cascade::store::Backend::Postgres(
                cascade::store::PgUrl::parse(&self.url()).unwrap(),
            ),
        }
    }

    /// A connection for the test's own queries.
    pub async fn db(&self) -> Db {
        match self.kind {
            Kind::Sqlite => Db::Sqlite(rusqlite::Connection::open(self.path()).unwrap()),
            Kind::Postgres => Db::Postgres(self.pg.as_ref().unwrap().client().await),
        }
    }
}

pub enum Db {
    Sqlite(rusqlite::Connection),
    Postgres(tokio_postgres::Client),
}

impl Db {
    /// Every row of `sql` as a JSON object by column name. Timestamps read as RFC 3339
    /// text on both stores, as operators see them.
    pub async fn rows(&self, sql: &str) -> Vec<Value> {
        match self {
            Db::Sqlite(conn) => {
                let mut stmt = conn.prepare(sql).unwrap();
                let names: Vec<String> = stmt.column_names().map(str::to_string).collect();
                stmt.query_map([], |r| {
                    let mut m = serde_json::Map::new();
                    for (i, n) in names.iter().enumerate() {
                        let v = match r.get_ref(i)? {
                            rusqlite::types::ValueRef::Null => Value::Null,
                            rusqlite::types::ValueRef::Integer(x) => json!(x),
                            rusqlite::types::ValueRef::Real(x) => json!(x),
                            rusqlite::types::ValueRef::Text(t) => {
                                json!(String::from_utf8_lossy(t))
                            }
                            rusqlite::types::ValueRef::Blob(_) => Value::Null,
                        };
                        m.insert(n.clone(), v);
                    }
                    Ok(Value::Object(m))
                })
                .unwrap()
                .map(Result::unwrap)
                .collect()
            }
            Db::Postgres(client) => {
                use tokio_postgres::types::Type;
                let rows = client.query(sql, &[]).await.unwrap();
                rows.iter()
                    .map(|r| {
                        let mut m = serde_json::Map::new();
                        for (i, c) in r.columns().iter().enumerate() {
                            let t = c.type_();
                            let v = if *t == Type::INT2 {
                                json!(r.get::<_, Option<i16>>(i))
                            } else if *t == Type::INT4 {
                                json!(r.get::<_, Option<i32>>(i))
                            } else if *t == Type::INT8 {
                                json!(r.get::<_, Option<i64>>(i))
                            } else if *t == Type::FLOAT8 {
                                json!(r.get::<_, Option<f64>>(i))
                            } else if *t == Type::FLOAT4 {
                                json!(r.get::<_, Option<f32>>(i))
                            } else if *t == Type::TEXT || *t == Type::VARCHAR || *t == Type::NAME {
                                json!(r.get::<_, Option<String>>(i))
                            } else if *t == Type::TIMESTAMPTZ {
                                json!(r
                                    .get::<_, Option<std::time::SystemTime>>(i)
                                    .map(|t| cascade::clock::rfc3339_ms(cascade::clock::to_ms(t))))
                            } else if *t == Type::BYTEA {
                                Value::Null
                            } else {
                                panic!(
                                    "column {} has type {t}: cast it in the test's SQL",
                                    c.name()
                                )
                            };
                            m.insert(c.name().to_string(), v);
                        }
                        Value::Object(m)
                    })
                    .collect()
            }
        }
    }

    /// The first column of the first row, as an integer.
    pub async fn count(&self, sql: &str) -> i64 {
        let rows = self.rows(sql).await;
        let first = rows
            .first()
            .and_then(|r| r.as_object()?.values().next().cloned());
        first
            .and_then(|v| v.as_i64())
            .unwrap_or_else(|| panic!("no count from {sql}: {rows:?}"))
    }
}

/// Runs each named `async fn name(kind: Kind)` twice, as `sqlite::name` and
/// `postgres::name`.
#[macro_export]
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::common::stores::Kind::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::common::stores::Kind::Postgres).await
                }
            )*
        }
    };
}
