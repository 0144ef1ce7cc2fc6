"""One router per resource."""

# Where the API lives. Routers under it carry the prefix themselves (not `include_router`)
# so that each route's `path` is its full template, the metrics middleware's `route` label.
API_PREFIX = "/api/v1"
