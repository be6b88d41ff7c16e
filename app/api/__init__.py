"""The HTTP API: routes, request/response schemas, error mapping and middleware."""
