// Swagger UI for /docs with local assets. The key typed into /ui (same tab) is sent with every
// request, the spec's own included; the Authorize button works as usual.
"use strict";

const key = sessionStorage.getItem("rlpips.apiKey");

window.ui = SwaggerUIBundle({
  url: "openapi.json",
  dom_id: "#swagger-ui",
  layout: "BaseLayout",
  deepLinking: true,
  showExtensions: true,
  showCommonExtensions: true,
  presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],
  requestInterceptor: (request) => {
    const given = request.headers["X-API-Key"] || request.headers.Authorization;
    if (key && !given) request.headers["X-API-Key"] = key;
    return request;
  },
});
