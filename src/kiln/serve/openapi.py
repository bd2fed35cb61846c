"""The OpenAPI document of an endpoint, from ``predict``'s annotations.

``GET /openapi.json`` serves it, so gateways, generated clients and schemathesis
know the request (the fields ``predict`` takes, unknown ones refused), the answer
(its return annotation; any JSON without one) and every error the endpoint answers.
"""

from __future__ import annotations

from typing import Any

from kiln.serve._validation import answer_adapter, request_model

OPENAPI_VERSION = "3.1.0"
_REF = "#/components/schemas/{model}"
_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {"type": "string", "description": "What went wrong, naming the field"},
        "detail": {
            "type": "array",
            "items": {"type": "object"},
            "description": "Each invalid field (422 only)",
        },
    },
}
_TRACE_HEADERS = {
    "traceparent": {
        "description": "W3C trace context of the request's span",
        "schema": {"type": "string"},
    },
    "x-kiln-trace-id": {
        "description": "The trace id, for `kiln why`",
        "schema": {"type": "string"},
    },
}


def _errors(*codes: tuple[int, str]) -> dict[str, Any]:
    return {
        str(code): {
            "description": text,
            "content": {"application/json": {"schema": {"$ref": _REF.format(model="Error")}}},
        }
        for code, text in codes
    }


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _get(
    summary: str, answer: dict[str, Any], extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {"get": {"summary": summary, "responses": {"200": answer, **(extra or {})}}}


def document(
    cls: type[Any], *, title: str, description: str = "", base: str = ""
) -> dict[str, Any]:
    """The OpenAPI 3.1 document of an endpoint serving ``cls``, its routes under ``base``
    (Ray Serve's route prefix; none for ``kiln serve``)."""
    request = request_model(cls)  # type: ignore[arg-type]
    schemas: dict[str, Any] = {"Error": _ERROR}
    request_schema = request.model_json_schema(ref_template=_REF)
    schemas.update(request_schema.pop("$defs", {}))
    schemas[request.__name__] = request_schema
    answer_schema = _answer_schema(cls)
    schemas.update(answer_schema.pop("$defs", {}))
    answer_name = f"{cls.__name__}Answer"
    schemas[answer_name] = answer_schema
    answer = {"$ref": _REF.format(model=answer_name)}
    any_object = {"type": "object"}
    predict = {
        "post": {
            "summary": (cls.predict.__doc__ or "Answer one request").strip().splitlines()[0],
            "operationId": "predict",
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": _REF.format(model=request.__name__)}}
                },
            },
            "responses": {
                "200": {
                    **_json(answer, "The answer of predict"),
                    "headers": {
                        **_TRACE_HEADERS,
                        "x-kiln-model": {
                            "description": "The model version that answered",
                            "schema": {"type": "string"},
                        },
                    },
                },
                **_errors(
                    (408, "The request body did not arrive in time"),
                    (413, "The request body is too large"),
                    (422, "The request does not match predict's arguments"),
                    (500, "predict raised, or answered something JSON cannot carry"),
                    (503, "No replica could answer (starting, or its version failed)"),
                ),
            },
        }
    }
    status = {"type": "object", "required": ["status"], "properties": {"status": {"const": "ok"}}}
    ready = {"type": "object", "required": ["ready"], "properties": {"ready": {"type": "boolean"}}}
    out: dict[str, Any] = {
        "openapi": OPENAPI_VERSION,
        "info": {"title": title, "version": "1", "description": description},
        "paths": {
            "/predict": predict,
            "/healthz": _get("The process is up", _json(status, "Up")),
            "/readyz": _get(
                "Ready to answer", _json(ready, "Ready"), {"503": _json(ready, "Not ready")}
            ),
            "/metrics": _get(
                "Prometheus metrics",
                {
                    "description": "Prometheus text format",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                },
            ),
            "/openapi.json": _get("This document", _json(any_object, "OpenAPI 3.1")),
            "/": _get("What is served", _json(any_object, "The endpoint and its versions")),
        },
        "components": {"schemas": schemas},
    }
    if base:
        out["servers"] = [{"url": base}]
        del out["paths"]["/metrics"], out["paths"]["/"]  # Ray Serve has its own
    return out


def _answer_schema(cls: type[Any]) -> dict[str, Any]:
    """The JSON schema of ``predict``'s return annotation (any JSON without one)."""
    adapter, _ = answer_adapter(cls)  # type: ignore[arg-type]
    if adapter is None:
        return {}
    schema: dict[str, Any] = adapter.json_schema(mode="serialization", ref_template=_REF)
    return schema
