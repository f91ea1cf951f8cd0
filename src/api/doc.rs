//! The OpenAPI 3.1 document of the worker's API.
//!
//! The operations come from the handlers' `#[utoipa::path]` attributes as the
//! router registers them (`super::routes`); the schemas from the types the
//! handlers read and answer with (`JobSpec`, `JobStatus`, `JobPage`,
//! `ProblemDetails`, ...), derived with `utoipa::ToSchema`. This file adds
//! what no handler says: the title, the tags, the bearer security scheme, and
//! the problem type list. `docs/openapi.json` is this document, checked in
//! (`rehydrate openapi > docs/openapi.json`); `tests/openapi.rs` fails when
//! it is stale.

use utoipa::openapi::OpenApi;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};

use super::problem::{ProblemDetails, ProblemType};

#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "rehydrate worker API",
        description = "Restore jobs for orchestrators: submit, list, get and cancel restores of block snapshots into files or block devices, plus metrics, health and readiness. Every error is an RFC 9457 problem (application/problem+json) whose type is one of ProblemType. The /v1 routes need `Authorization: Bearer TOKEN` when the worker has tokens configured; the others never do."
    ),
    tags(
        (name = "jobs", description = "Restore jobs (/v1, bearer token)"),
        (name = "peers", description = "Blocks this worker holds, for peer workers (/v1, bearer token)"),
        (name = "operations", description = "Metrics, health, readiness and this document (no token)")
    ),
    components(schemas(ProblemDetails, ProblemType)),
    modifiers(&BearerAuth)
)]
struct ApiDoc;

/// The `bearer` security scheme the `/v1` operations name.
struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme("bearer", SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)));
    }
}

/// The whole document: [`ApiDoc`] with the operations of the token-guarded
/// routes `v1` and the open ones `open`.
pub(super) fn document(v1: OpenApi, open: OpenApi) -> OpenApi {
    <ApiDoc as utoipa::OpenApi>::openapi().merge_from(v1).merge_from(open)
}

/// The document as the bytes of `docs/openapi.json`: pretty JSON and a
/// final newline.
pub(super) fn to_json(document: &OpenApi) -> String {
    let mut text = document.to_pretty_json().unwrap_or_default();
    text.push('\n');
    text
}
