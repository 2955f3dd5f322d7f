//! What the controller did and why, per subscription (like Kubernetes Events). Bounded.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "events")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub subscription_id: String,
    pub created_at: DateTimeUtc,
    /// `Normal` or `Warning` (see [`crate::db::events::EventKind`]).
    pub kind: String,
    /// Short CamelCase cause, e.g. `ServerCreated`.
    pub reason: String,
    pub message: String,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
