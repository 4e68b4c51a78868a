"""api/openapi.yaml is the contract: this suite holds the route table and the
real daemon to it, with well-kept tools -- PyYAML reads the spec and
jsonschema (Draft 2020-12) validates every body (Debian's python3-yaml and
python3-jsonschema).

  - the spec's (method, path) pairs equal api_routes[] both ways, with the
    same auth needs, scopes (x-optd-scope) and body media types (the table is read by a small C
    program compiled here from api/routes.c, as the daemon is built);
  - every documented operation, driven against a real daemon with valid and
    invalid requests, answers a status the spec documents for it, with a
    documented media type, a body valid against the documented JSON schema,
    every required header and no undocumented Optd-* header; errors are
    problem+json with the Problem schema's members; every documented
    (operation, status) pair is driven (503, a storage failure, aside);
  - every Optd-* header the spec names for the step operation shows up in
    real step answers, and its header parameters are the ones the daemon
    reads;
  - GET /v1/optimizers (the authoritative catalogue) agrees with the spec's
    per-type hyperparameter schemas;
  - every problem type URN the daemon can emit is in the spec and has a
    section in docs/errors.md;
  - every keyword the spec's schemas use is one the validator enforces or a
    known annotation, so the spec cannot lean on a rule nothing checks.

Run from the repository root (tests/run.sh does): OPTD_BIN names the daemon.
"""

import http.client
import json
import math
import os
import re
import shutil
import signal
import struct
import subprocess
import tempfile
import unittest

import jsonschema
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC_PATH = os.path.join(ROOT, "api", "openapi.yaml")
ERRORS_DOC = os.path.join(ROOT, "docs", "errors.md")
OPTD_BIN = os.environ.get("OPTD_BIN") or os.path.join(ROOT, "build", "optd")
API_KEY = "openapi-test-key"
MAX_BODY_MB = 1
METHODS = ["get", "put", "post", "patch", "delete", "head", "options", "trace"]

with open(SPEC_PATH, encoding="utf-8") as _f:
    SPEC_TEXT = _f.read()
SPEC = yaml.safe_load(SPEC_TEXT)


# ------------------------------------------------------------ the spec

def ref(pointer):
    """The node a local $ref ("#/components/schemas/X") points at."""
    assert pointer.startswith("#/"), pointer
    node = SPEC
    for part in pointer[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or part not in node:
            raise AssertionError("$ref %s does not resolve" % pointer)
        node = node[part]
    return node


def deref(node):
    for _ in range(16):
        if isinstance(node, dict) and "$ref" in node:
            node = ref(node["$ref"])
        else:
            return node
    raise AssertionError("$ref chain too long")


class Op:
    def __init__(self, method, path, item, op):
        self.method, self.path, self.item, self.op = method, path, item, op

    def response(self, status):
        r = self.op.get("responses", {}).get(str(status))
        return deref(r) if r is not None else None


OPS = [Op(m.upper(), p, item, item[m])
       for p, item in SPEC["paths"].items() for m in item if m in METHODS]


def spec_find(method, path):
    for o in OPS:
        if o.method == method and o.path == path:
            return o
    return None


def path_fits(template, path):
    pattern = "^" + re.sub(r"\\\{[^}]*\\\}", "[^/?]+", re.escape(template)) + r"(\?.*)?$"
    return re.match(pattern, path) is not None


def spec_match(method, path):
    for o in OPS:
        if o.method == method and path_fits(o.path, path):
            return o
    return None


# ------------------------------------------------------------ validation

FORMATS = jsonschema.FormatChecker(formats=())
DATE_TIME = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?"
                       r"(Z|[+-][0-9]{2}:[0-9]{2})$")


@FORMATS.checks("date-time")
def _is_date_time(value):
    return not isinstance(value, str) or DATE_TIME.match(value) is not None


RESOLVER = jsonschema.RefResolver(base_uri="", referrer=SPEC)
Validator = jsonschema.Draft202012Validator


def errors_of(schema, value):
    v = Validator(schema, resolver=RESOLVER, format_checker=FORMATS)
    return sorted(v.iter_errors(value), key=lambda e: list(e.absolute_path))


def assert_valid(tc, schema, value, what):
    errs = errors_of(schema, value)
    if errs:
        best = jsonschema.exceptions.best_match(errs)
        tc.fail("%s: %s at $%s\n  body: %.600s" % (
            what, best.message, "".join("[%r]" % p for p in best.absolute_path),
            json.dumps(value)))


# Keywords the validator enforces (Draft 2020-12 as jsonschema implements
# it, formats as FORMATS checks them) and annotations that constrain nothing.
ENFORCED = {"$ref", "type", "const", "enum", "required", "properties", "additionalProperties",
            "items", "minItems", "maxItems", "minLength", "maxLength", "minimum", "maximum",
            "exclusiveMinimum", "exclusiveMaximum", "pattern", "format", "oneOf", "anyOf",
            "allOf", "not", "prefixItems", "uniqueItems", "minProperties", "maxProperties",
            "patternProperties", "propertyNames", "multipleOf", "if", "then", "else"}
ANNOTATIONS = {"description", "default", "example", "examples", "title", "discriminator",
               "contentMediaType", "deprecated", "readOnly", "writeOnly"}
SCHEMA_CHILDREN = {"items", "additionalProperties", "not", "if", "then", "else",
                   "propertyNames"}
SCHEMA_LISTS = {"oneOf", "anyOf", "allOf", "prefixItems"}
SCHEMA_MAPS = {"properties", "patternProperties"}


def schema_keywords(schema, where, out):
    """Collects (keyword, where) of a schema and its subschemas."""
    if not isinstance(schema, dict):
        return
    for k, v in schema.items():
        out.append((k, where))
        if k in SCHEMA_CHILDREN and isinstance(v, dict):
            schema_keywords(v, where + "/" + k, out)
        elif k in SCHEMA_LISTS:
            for i, s in enumerate(v):
                schema_keywords(s, "%s/%s/%d" % (where, k, i), out)
        elif k in SCHEMA_MAPS:
            for name, s in v.items():
                schema_keywords(s, "%s/%s/%s" % (where, k, name), out)


def all_schemas():
    """Every schema of the spec: components, parameters, bodies, answers."""
    for name, s in SPEC.get("components", {}).get("schemas", {}).items():
        yield "#/components/schemas/" + name, s

    def media(node, where):
        for mt, m in (deref(node).get("content") or {}).items():
            if "schema" in m:
                yield where + " " + mt, m["schema"]
    for name, p in SPEC.get("components", {}).get("parameters", {}).items():
        if "schema" in p:
            yield "#/components/parameters/" + name, p["schema"]
    for name, r in SPEC.get("components", {}).get("responses", {}).items():
        yield from media(r, "#/components/responses/" + name)
        for h, hd in (r.get("headers") or {}).items():
            if "schema" in deref(hd):
                yield "#/components/responses/%s header %s" % (name, h), deref(hd)["schema"]
    for o in OPS:
        where = "%s %s" % (o.method, o.path)
        for p in o.op.get("parameters", []) + o.item.get("parameters", []):
            if "schema" in deref(p):
                yield where + " parameter", deref(p)["schema"]
        if "requestBody" in o.op:
            yield from media(o.op["requestBody"], where + " body")
        for st, r in o.op["responses"].items():
            yield from media(r, "%s %s" % (where, st))


# ------------------------------------------------------------ the daemon

class Answer:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers          # list of (name, value)
        self.body = body

    def header(self, name):
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    @property
    def content_type(self):
        return self.header("Content-Type") or ""

    def json(self):
        return json.loads(self.body.decode("utf-8"))


class Daemon:
    def __init__(self, args):
        self.dir = tempfile.mkdtemp(prefix="optd-openapi-")
        with open(os.path.join(self.dir, "log"), "wb") as log:
            self.proc = subprocess.Popen(
                [OPTD_BIN, "--port", "0", "--db", os.path.join(self.dir, "optd.db"),
                 "--log-level", "warn"] + args,
                stdout=subprocess.PIPE, stderr=log)
        line = self.proc.stdout.readline().decode()
        m = re.match(r"optd listening on http://127\.0\.0\.1:(\d+)", line)
        if not m:
            self.proc.kill()
            raise RuntimeError("optd did not start: %r %s" % (line, self.log()))
        self.port = int(m.group(1))

    def log(self):
        with open(os.path.join(self.dir, "log"), encoding="utf-8", errors="replace") as f:
            return f.read()

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=30)
        self.proc.stdout.close()
        shutil.rmtree(self.dir, ignore_errors=True)
        return rc

    def request(self, method, path, headers=(), body=None, key=True):
        """One request on a fresh connection; body is bytes or None.  key:
        True sends the admin key, False nothing, a string that token."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            hdrs = {}
            for h in headers:
                k, _, v = h.partition(":")
                hdrs[k.strip()] = v.strip()
            if key:
                hdrs["Authorization"] = "Bearer " + (API_KEY if key is True else key)
            if hdrs.get("Expect", "").lower() == "100-continue" and body is not None:
                # A body past the limit: the daemon must refuse it from the
                # Content-Length alone, before any of it is sent.
                conn.putrequest(method, path, skip_accept_encoding=True)
                for k, v in hdrs.items():
                    conn.putheader(k, v)
                conn.putheader("Content-Length", str(len(body)))
                conn.endheaders()
            else:
                if body is not None:
                    hdrs["Content-Length"] = str(len(body))
                conn.request(method, path, body=body, headers=hdrs)
            r = conn.getresponse()
            return Answer(r.status, r.getheaders(), r.read())
        finally:
            conn.close()

    def snapshot(self, name):
        a = self.request("GET", "/v1/sessions/" + name)
        p = self.request("GET", "/v1/sessions/%s/params" % name, ["Accept: application/octet-stream"])
        doc = a.json()
        return doc["step"], doc.get("counters"), p.body


def route_table():
    """api_routes[] and api_problem_type(), from a small C program built
    here against api/routes.c and api/reply.c."""
    tmp = tempfile.mkdtemp(prefix="optd-routes-")
    try:
        src = os.path.join(tmp, "dump.c")
        with open(src, "w", encoding="utf-8") as f:
            f.write(r'''
#include <stdio.h>
#include "api/api.h"
int main(void)
{
    printf("{\"routes\":[");
    for (size_t i = 0; i < api_route_count; i++)
        printf("%s{\"method\":\"%s\",\"pattern\":\"%s\",\"body\":%d,\"scope\":%d}",
               i ? "," : "", api_routes[i].method, api_routes[i].pattern, api_routes[i].body,
               api_routes[i].scope);
    printf("],\"body_kinds\":{\"none\":%d,\"json\":%d,\"vector\":%d,\"binary\":%d},"
           "\"problem_types\":{", API_BODY_NONE, API_BODY_JSON, API_BODY_VECTOR, API_BODY_BINARY);
    for (int st = 400; st < 600; st++)
        printf("%s\"%d\":\"%s\"", st > 400 ? "," : "", st, api_problem_type(st));
    printf("}}\n");
    return 0;
}
''')
        cflags = subprocess.run(["pkg-config", "--cflags", "--libs", "libcjson"], check=True,
                                stdout=subprocess.PIPE).stdout.decode().split()
        exe = os.path.join(tmp, "dump")
        subprocess.run(["cc", "-std=c11", "-D_POSIX_C_SOURCE=200809L", "-I", ROOT, src,
                        os.path.join(ROOT, "api", "routes.c"), os.path.join(ROOT, "api", "reply.c"),
                        os.path.join(ROOT, "api", "numfmt.c"),
                        "-o", exe] + cflags + ["-lm"], check=True)
        return json.loads(subprocess.run([exe], check=True, stdout=subprocess.PIPE).stdout)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


TABLE = route_table()


# ------------------------------------------------------------ scenarios

JSONCT = "Content-Type: application/json"
BINCT = "Content-Type: application/octet-stream"
BINACC = "Accept: application/octet-stream"
TEXTACC = "Accept: text/plain"
TEXTCT = "Content-Type: text/plain"
EXPECT100 = "Expect: 100-continue"
SGD3 = '{"optimizer":{"type":"sgd","lr":0.1},"params":[1,2,3]}'

GRAD3 = struct.pack("<3f", 0.5, -0.25, 1.0)
NAN3 = struct.pack("<3f", 0.5, math.nan, 1.0)
GRAD2 = struct.pack("<2f", 0.5, 0.5)
NAN2 = struct.pack("<2f", math.inf, 0.5)
BIG = b"{" + b" " * (MAX_BODY_MB * 1024 * 1024 + 4094) + b"}"


def state_file(size, config):
    """A minimal optd state file (safetensors) for a one-tensor session."""
    meta = {"optd.format": "1", "optd.config": json.dumps(config),
            "optd.state": json.dumps({"step": 3, "steps": {"params": 3}})}
    data = struct.pack("<%df" % size, *[0.25 * i for i in range(size)])
    header = {"__metadata__": meta,
              "params": {"dtype": "F32", "shape": [size], "data_offsets": [0, len(data)]}}
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


STATE2 = state_file(2, {"dtype": "float32", "size": 2, "optimizer": {"type": "sgd", "lr": 0.1}})

KEY, ANON = True, False
# Tokens (minted in setUpClass, by role) and the daemon without an admin key.
READ, STEP, ADMIN, OTHER, SLOW, QUOTA, OFF = ("read", "step", "admin", "other", "slow", "quota",
                                              "off")
TOKEN_ROLES = {
    READ: '{"scopes":["read"],"prefix":""}',
    STEP: '{"scopes":["step"]}',
    ADMIN: '{"scopes":["admin"],"label":"openapi"}',
    OTHER: '{"scopes":["admin"],"prefix":"elsewhere-"}',
    SLOW: '{"scopes":["step"],"quotas":{"steps_per_second":0.01,"burst":1}}',
    QUOTA: '{"scopes":["admin"],"prefix":"q","quotas":{"max_sessions":1,"max_params":2}}',
}
SCOPE_NAMES = {0: None, 1: "read", 2: "step", 3: "admin", 4: "admin-key"}

# (label, who, method, path, headers, body (str JSON text, or bytes), status)
SCENARIOS = [
    ("healthz", ANON, "GET", "/healthz", [], None, 200),
    ("healthz any Accept", ANON, "GET", "/healthz", ["Accept: text/html"], None, 200),
    ("catalogue", KEY, "GET", "/v1/optimizers", [], None, 200),
    ("catalogue 401", ANON, "GET", "/v1/optimizers", [], None, 401),
    ("catalogue 406", KEY, "GET", "/v1/optimizers", [BINACC], None, 406),

    ("create", KEY, "PUT", "/v1/sessions/t", [JSONCT], SGD3, 201),
    ("create again", KEY, "PUT", "/v1/sessions/t", [JSONCT], SGD3, 200),
    ("create differently", KEY, "PUT", "/v1/sessions/t", [JSONCT],
     '{"optimizer":{"type":"sgd","lr":0.2},"params":[1,2,3]}', 409),
    ("create full", KEY, "PUT", "/v1/sessions/full", [JSONCT],
     '{"optimizer":{"type":"adamw","lr":0.01,"betas":[0.8,0.9]},"size":4,'
     '"init":{"type":"normal","std":0.5,"seed":7},"dtype":"float64",'
     '"schedule":{"type":"cosine","T_max":100,"warmup_steps":3},'
     '"clip":{"type":"norm","max_norm":1,"norm_type":"inf"},'
     '"mode":{"type":"async","max_staleness":5,"stale_policy":"damp"},'
     '"nonfinite":"skip","metadata":{"run":"r1","tags":[1,2]}}', 201),
    ("create by name", KEY, "PUT", "/v1/sessions/byname", [JSONCT],
     '{"optimizer":"adam","size":2}', 201),
    ("create plateau", KEY, "PUT", "/v1/sessions/plateau", [JSONCT],
     '{"optimizer":{"type":"rprop"},"size":2,"init":{"type":"uniform","seed":1},'
     '"schedule":{"type":"reduce_on_plateau","patience":2},'
     '"clip":{"type":"value","max_value":0.5}}', 201),
    ("create malformed", KEY, "PUT", "/v1/sessions/t2", [JSONCT], '{"optimizer":', 400),
    ("create bad name", KEY, "PUT", "/v1/sessions/bad!name", [JSONCT], SGD3, 400),
    ("create 415", KEY, "PUT", "/v1/sessions/t2", [TEXTCT], SGD3, 415),
    ("create 406", KEY, "PUT", "/v1/sessions/t2", [JSONCT, BINACC], SGD3, 406),
    ("create too many params", KEY, "PUT", "/v1/sessions/t2", [JSONCT],
     '{"optimizer":{"type":"sgd","lr":1},"size":1000000}', 413),
    ("create huge body", KEY, "PUT", "/v1/sessions/t2", [JSONCT, EXPECT100], BIG, 413),
    ("create non-finite", KEY, "PUT", "/v1/sessions/t2", [JSONCT],
     '{"optimizer":{"type":"sgd","lr":1},"params":[1e39]}', 422),
    ("create 401", ANON, "PUT", "/v1/sessions/t2", [JSONCT], SGD3, 401),

    ("list", KEY, "GET", "/v1/sessions", [], None, 200),
    ("list page", KEY, "GET", "/v1/sessions?limit=1&after=full", [], None, 200),
    ("list bad limit", KEY, "GET", "/v1/sessions?limit=0", [], None, 400),
    ("list bad after", KEY, "GET", "/v1/sessions?after=a!b", [], None, 400),
    ("list 401", ANON, "GET", "/v1/sessions", [], None, 401),
    ("list 406", KEY, "GET", "/v1/sessions", [TEXTACC], None, 406),

    ("get", KEY, "GET", "/v1/sessions/t", [], None, 200),
    ("get full", KEY, "GET", "/v1/sessions/full", [], None, 200),
    ("get 404", KEY, "GET", "/v1/sessions/nope", [], None, 404),
    ("get bad name", KEY, "GET", "/v1/sessions/bad!name", [], None, 400),
    ("get 406", KEY, "GET", "/v1/sessions/t", [BINACC], None, 406),
    ("get 401", ANON, "GET", "/v1/sessions/t", [], None, 401),

    ("step json", KEY, "POST", "/v1/sessions/t/step", [JSONCT, "Idempotency-Key: k-1"],
     '{"grad":[1,1,1],"loss":0.5,"worker":"w0"}', 200),
    ("step replay", KEY, "POST", "/v1/sessions/t/step", [JSONCT, "Idempotency-Key: k-1"],
     '{"grad":[1,1,1],"loss":0.5,"worker":"w0"}', 200),
    ("step binary", KEY, "POST", "/v1/sessions/t/step",
     [BINCT, BINACC, "Optd-Loss: 0.25", "Optd-Base-Step: 1", "Optd-Worker: w1"], GRAD3, 200),
    ("step no params", KEY, "POST", "/v1/sessions/t/step?params=false", [JSONCT],
     '{"grad":[0.5,0.5,0.5],"base_step":2}', 200),
    ("step binary no params", KEY, "POST", "/v1/sessions/t/step?params=false",
     [BINCT, BINACC], GRAD3, 200),
    ("step full", KEY, "POST", "/v1/sessions/full/step", [JSONCT],
     '{"grad":[1,2,3,4],"loss":null,"base_step":0}', 200),
    ("step wrong length", KEY, "POST", "/v1/sessions/t/step", [JSONCT], '{"grad":[1,1]}', 422),
    ("step binary wrong length", KEY, "POST", "/v1/sessions/t/step", [BINCT], GRAD2, 422),
    ("step nan", KEY, "POST", "/v1/sessions/t/step", [BINCT], NAN3, 422),
    ("step not a number", KEY, "POST", "/v1/sessions/t/step", [JSONCT], '{"grad":[1,"x",1]}',
     400),
    ("step bad header", KEY, "POST", "/v1/sessions/t/step", [BINCT, "Optd-Loss: many"], GRAD3,
     400),
    ("step ahead", KEY, "POST", "/v1/sessions/t/step", [JSONCT],
     '{"grad":[1,1,1],"base_step":99}', 409),
    ("step 415", KEY, "POST", "/v1/sessions/t/step", [TEXTCT], '{"grad":[1,1,1]}', 415),
    ("step 406", KEY, "POST", "/v1/sessions/t/step", [JSONCT, TEXTACC], '{"grad":[1,1,1]}', 406),
    ("step huge body", KEY, "POST", "/v1/sessions/t/step", [BINCT, EXPECT100], BIG, 413),
    ("step 404", KEY, "POST", "/v1/sessions/nope/step", [JSONCT], '{"grad":[1]}', 404),
    ("step 401", ANON, "POST", "/v1/sessions/t/step", [JSONCT], '{"grad":[1,1,1]}', 401),
    ("step no body", KEY, "POST", "/v1/sessions/t/step", [JSONCT], "", 400),

    ("create acc", KEY, "PUT", "/v1/sessions/acc", [JSONCT],
     '{"optimizer":{"type":"adam","lr":0.1},"params":[1,2],'
     '"mode":{"type":"async","accumulate":2},"nonfinite":"skip"}', 201),
    ("step accumulated", KEY, "POST", "/v1/sessions/acc/step", [JSONCT], '{"grad":[1,1]}', 202),
    ("patch accumulate while pending", KEY, "PATCH", "/v1/sessions/acc", [JSONCT],
     '{"mode":{"type":"async","accumulate":3}}', 409),
    ("step accumulated binary", KEY, "POST", "/v1/sessions/acc/step", [BINCT, BINACC], GRAD2,
     200),
    ("step skipped", KEY, "POST", "/v1/sessions/acc/step", [BINCT], NAN2, 200),

    ("create sync", KEY, "PUT", "/v1/sessions/sy", [JSONCT],
     '{"optimizer":{"type":"sgd","lr":0.1},"size":2,"mode":{"type":"sync","workers":1}}', 201),
    ("step sync", KEY, "POST", "/v1/sessions/sy/step", [JSONCT],
     '{"grad":[1,1],"worker":"a"}', 200),
    ("step sync no worker", KEY, "POST", "/v1/sessions/sy/step", [JSONCT], '{"grad":[1,1]}', 400),
    ("step sync wrong round", KEY, "POST", "/v1/sessions/sy/step", [JSONCT],
     '{"grad":[1,1],"worker":"a","base_step":0}', 409),
    ("create sync pair", KEY, "PUT", "/v1/sessions/sy2", [JSONCT],
     '{"optimizer":{"type":"sgd","lr":0.1},"size":2,'
     '"mode":{"type":"sync","workers":2,"timeout_ms":150}}', 201),
    ("step sync timeout", KEY, "POST", "/v1/sessions/sy2/step", [JSONCT],
     '{"grad":[1,1],"worker":"lonely"}', 504),

    ("params", KEY, "GET", "/v1/sessions/t/params", [], None, 200),
    ("params binary", KEY, "GET", "/v1/sessions/t/params", [BINACC], None, 200),
    ("params 404", KEY, "GET", "/v1/sessions/nope/params", [], None, 404),
    ("params bad name", KEY, "GET", "/v1/sessions/bad!name/params", [], None, 400),
    ("params 406", KEY, "GET", "/v1/sessions/t/params", [TEXTACC], None, 406),
    ("params 401", ANON, "GET", "/v1/sessions/t/params", [], None, 401),

    ("set params", KEY, "PUT", "/v1/sessions/t/params", [JSONCT], '{"params":[3,2,1]}', 200),
    ("set params binary", KEY, "PUT", "/v1/sessions/t/params", [BINCT, BINACC], GRAD3, 200),
    ("set params wrong length", KEY, "PUT", "/v1/sessions/t/params", [JSONCT], '{"params":[1]}',
     422),
    ("set params nan", KEY, "PUT", "/v1/sessions/t/params", [BINCT], NAN3, 422),
    ("set params unknown member", KEY, "PUT", "/v1/sessions/t/params", [JSONCT],
     '{"params":[1,2,3],"step":4}', 400),
    ("set params 415", KEY, "PUT", "/v1/sessions/t/params", [TEXTCT], '{"params":[1,2,3]}', 415),
    ("set params 406", KEY, "PUT", "/v1/sessions/t/params", [JSONCT, TEXTACC],
     '{"params":[1,2,3]}', 406),
    ("set params huge body", KEY, "PUT", "/v1/sessions/t/params", [BINCT, EXPECT100], BIG, 413),
    ("set params 404", KEY, "PUT", "/v1/sessions/nope/params", [JSONCT], '{"params":[1]}', 404),
    ("set params 401", ANON, "PUT", "/v1/sessions/t/params", [JSONCT], '{"params":[1,2,3]}',
     401),

    ("state", KEY, "GET", "/v1/sessions/t/state", [BINACC], None, 200),
    ("state any Accept", KEY, "GET", "/v1/sessions/t/state", [], None, 200),
    ("state 404", KEY, "GET", "/v1/sessions/nope/state", [], None, 404),
    ("state bad name", KEY, "GET", "/v1/sessions/bad!name/state", [], None, 400),
    ("state 406", KEY, "GET", "/v1/sessions/t/state", [TEXTACC], None, 406),
    ("state 401", ANON, "GET", "/v1/sessions/t/state", [], None, 401),
    ("import new", KEY, "PUT", "/v1/sessions/imported/state", [BINCT], STATE2, 201),
    ("import over", KEY, "PUT", "/v1/sessions/imported/state", [BINCT], STATE2, 200),
    ("import garbage", KEY, "PUT", "/v1/sessions/imported/state", [BINCT], b"garbage!", 400),
    ("import another layout", KEY, "PUT", "/v1/sessions/t/state", [BINCT], STATE2, 422),
    ("import 415", KEY, "PUT", "/v1/sessions/imported/state", [JSONCT], STATE2, 415),
    ("import 406", KEY, "PUT", "/v1/sessions/imported/state", [BINCT, TEXTACC], STATE2, 406),
    ("import huge body", KEY, "PUT", "/v1/sessions/imported/state", [BINCT, EXPECT100], BIG,
     413),
    ("import 401", ANON, "PUT", "/v1/sessions/imported/state", [BINCT], STATE2, 401),

    ("create kept", KEY, "PUT", "/v1/sessions/tt", [JSONCT],
     '{"optimizer":{"type":"sgd","lr":0.1},"params":[1,2,3],'
     '"retain":{"every_steps":2,"keep":2}}', 201),
    ("step kept 1", KEY, "POST", "/v1/sessions/tt/step", [JSONCT], '{"grad":[1,1,1]}', 200),
    ("step kept 2", KEY, "POST", "/v1/sessions/tt/step", [JSONCT], '{"grad":[1,1,1]}', 200),
    ("step kept 3", KEY, "POST", "/v1/sessions/tt/step", [JSONCT], '{"grad":[1,1,1]}', 200),
    ("checkpoints", KEY, "GET", "/v1/sessions/tt/checkpoints", [], None, 200),
    ("checkpoints 404", KEY, "GET", "/v1/sessions/nope/checkpoints", [], None, 404),
    ("checkpoints bad name", KEY, "GET", "/v1/sessions/bad!name/checkpoints", [], None, 400),
    ("checkpoints 406", KEY, "GET", "/v1/sessions/tt/checkpoints", [BINACC], None, 406),
    ("checkpoints 401", ANON, "GET", "/v1/sessions/tt/checkpoints", [], None, 401),
    ("label", KEY, "POST", "/v1/sessions/tt/checkpoints", [JSONCT], '{"label":"l3"}', 201),
    ("label again", KEY, "POST", "/v1/sessions/tt/checkpoints", [JSONCT], '{"label":"l3"}', 409),
    ("label bad", KEY, "POST", "/v1/sessions/tt/checkpoints", [JSONCT], '{"label":"a b"}', 400),
    ("label 404", KEY, "POST", "/v1/sessions/nope/checkpoints", [JSONCT], '{"label":"x"}', 404),
    ("label 406", KEY, "POST", "/v1/sessions/tt/checkpoints", [JSONCT, BINACC], '{"label":"x"}',
     406),
    ("label 415", KEY, "POST", "/v1/sessions/tt/checkpoints", [TEXTCT], '{"label":"x"}', 415),
    ("label huge body", KEY, "POST", "/v1/sessions/tt/checkpoints", [JSONCT, EXPECT100], BIG,
     413),
    ("label 401", ANON, "POST", "/v1/sessions/tt/checkpoints", [JSONCT], '{"label":"x"}', 401),
    ("fork", KEY, "PUT", "/v1/sessions/tf", [JSONCT],
     '{"fork":{"from":"tt","step":2},"optimizer":{"lr":0.05},"replay":true}', 201),
    ("fork taken", KEY, "PUT", "/v1/sessions/tf", [JSONCT], '{"fork":{"from":"tt"}}', 409),
    ("fork 404", KEY, "PUT", "/v1/sessions/tf2", [JSONCT], '{"fork":{"from":"nope"}}', 404),
    ("fork ahead", KEY, "PUT", "/v1/sessions/tf2", [JSONCT],
     '{"fork":{"from":"tt","step":9}}', 422),
    ("rollback", KEY, "POST", "/v1/sessions/tt/rollback", [JSONCT], '{"step":2}', 200),
    ("rollback label gone", KEY, "POST", "/v1/sessions/tt/rollback", [JSONCT], '{"label":"l3"}',
     404),
    ("rollback not kept", KEY, "POST", "/v1/sessions/tt/rollback", [JSONCT], '{"step":0}', 409),
    ("rollback ahead", KEY, "POST", "/v1/sessions/tt/rollback", [JSONCT], '{"step":7}', 422),
    ("rollback bad", KEY, "POST", "/v1/sessions/tt/rollback", [JSONCT], '{"step":-1}', 400),
    ("rollback 406", KEY, "POST", "/v1/sessions/tt/rollback", [JSONCT, BINACC], '{"step":1}',
     406),
    ("rollback 415", KEY, "POST", "/v1/sessions/tt/rollback", [TEXTCT], '{"step":1}', 415),
    ("rollback huge body", KEY, "POST", "/v1/sessions/tt/rollback", [JSONCT, EXPECT100], BIG,
     413),
    ("rollback 401", ANON, "POST", "/v1/sessions/tt/rollback", [JSONCT], '{"step":1}', 401),

    ("export", KEY, "GET", "/v1/sessions/tt/export", [BINACC], None, 200),
    ("export log", KEY, "GET", "/v1/sessions/tt/export?log=true", [], None, 200),
    ("export bad log", KEY, "GET", "/v1/sessions/tt/export?log=yes", [], None, 400),
    ("export 404", KEY, "GET", "/v1/sessions/nope/export", [], None, 404),
    ("export 406", KEY, "GET", "/v1/sessions/tt/export", [TEXTACC], None, 406),
    ("export 401", ANON, "GET", "/v1/sessions/tt/export", [], None, 401),
    ("import export", KEY, "PUT", "/v1/sessions/tx/export", [BINCT], STATE2, 201),
    ("import export taken", KEY, "PUT", "/v1/sessions/tx/export", [BINCT], STATE2, 409),
    ("import export garbage", KEY, "PUT", "/v1/sessions/ty/export", [BINCT], b"garbage!", 400),
    ("import export foreign", KEY, "PUT", "/v1/sessions/ty/export", [BINCT],
     state_file(2, {"dtype": "float32"}), 422),
    ("import export 415", KEY, "PUT", "/v1/sessions/ty/export", [JSONCT], STATE2, 415),
    ("import export 406", KEY, "PUT", "/v1/sessions/ty/export", [BINCT, TEXTACC], STATE2, 406),
    ("import export huge body", KEY, "PUT", "/v1/sessions/ty/export", [BINCT, EXPECT100], BIG,
     413),
    ("import export 401", ANON, "PUT", "/v1/sessions/ty/export", [BINCT], STATE2, 401),
    ("history", KEY, "GET", "/v1/sessions/t/history", [], None, 200),
    ("history page", KEY, "GET", "/v1/sessions/t/history?after=1&limit=1", [], None, 200),
    ("history bad limit", KEY, "GET", "/v1/sessions/t/history?limit=0", [], None, 400),
    ("history 404", KEY, "GET", "/v1/sessions/nope/history", [], None, 404),
    ("history 406", KEY, "GET", "/v1/sessions/t/history", [BINACC], None, 406),
    ("history 401", ANON, "GET", "/v1/sessions/t/history", [], None, 401),

    ("patch", KEY, "PATCH", "/v1/sessions/t", [JSONCT],
     '{"optimizer":{"lr":0.05,"momentum":0.9},"schedule":{"type":"step",'
     '"step_size":10},"clip":null,"metadata":{"k":"v"},"nonfinite":"skip"}', 200),
    ("patch to sync", KEY, "PATCH", "/v1/sessions/plateau", [JSONCT],
     '{"mode":{"type":"sync","workers":3,"reduce":"sum","on_timeout":"apply"}}', 200),
    ("patch dtype", KEY, "PATCH", "/v1/sessions/t", [JSONCT], '{"dtype":"float64"}', 400),
    ("patch 415", KEY, "PATCH", "/v1/sessions/t", [TEXTCT], "{}", 415),
    ("patch 406", KEY, "PATCH", "/v1/sessions/t", [JSONCT, BINACC], "{}", 406),
    ("patch huge body", KEY, "PATCH", "/v1/sessions/t", [JSONCT, EXPECT100], BIG, 413),
    ("patch 404", KEY, "PATCH", "/v1/sessions/nope", [JSONCT], "{}", 404),
    ("patch 401", ANON, "PATCH", "/v1/sessions/t", [JSONCT], "{}", 401),

    ("events history", KEY, "GET", "/v1/sessions/t/events?after=0&live=false", [], None, 200),
    ("events resume", KEY, "GET", "/v1/sessions/t/events?live=false", ["Last-Event-ID: 1"], None,
     200),
    ("events bad id", KEY, "GET", "/v1/sessions/t/events", ["Last-Event-ID: x"], None, 400),
    ("events 404", KEY, "GET", "/v1/sessions/nope/events", [], None, 404),
    ("events 401", ANON, "GET", "/v1/sessions/t/events", [], None, 401),
    ("metrics", KEY, "GET", "/metrics", [], None, 200),
    ("metrics 401", ANON, "GET", "/metrics", [], None, 401),
    ("dashboard", ANON, "GET", "/", ["Accept: text/html"], None, 200),
    ("asset", ANON, "GET", "/assets/app.js", [], None, 200),
    ("asset 404", ANON, "GET", "/assets/nope.js", [], None, 404),
    ("asset bad name", ANON, "GET", "/assets/bad!name", [], None, 400),

    # Tokens: a scope too small or a name outside the prefix is 403.
    ("catalogue by token", READ, "GET", "/v1/optimizers", [], None, 200),
    ("list by token", OTHER, "GET", "/v1/sessions", [], None, 200),
    ("create 403", READ, "PUT", "/v1/sessions/t3", [JSONCT], SGD3, 403),
    ("get 403", OTHER, "GET", "/v1/sessions/t", [], None, 403),
    ("patch 403", STEP, "PATCH", "/v1/sessions/t", [JSONCT], "{}", 403),
    ("step by token", STEP, "POST", "/v1/sessions/t/step", [JSONCT], '{"grad":[1,1,1]}', 200),
    ("step 403", READ, "POST", "/v1/sessions/t/step", [JSONCT], '{"grad":[1,1,1]}', 403),
    ("step by slow token", SLOW, "POST", "/v1/sessions/t/step", [JSONCT], '{"grad":[1,1,1]}',
     200),
    ("step 429", SLOW, "POST", "/v1/sessions/t/step", [JSONCT], '{"grad":[1,1,1]}', 429),
    ("params 403", OTHER, "GET", "/v1/sessions/t/params", [], None, 403),
    ("set params 403", STEP, "PUT", "/v1/sessions/t/params", [JSONCT], '{"params":[1,2,3]}',
     403),
    ("history 403", OTHER, "GET", "/v1/sessions/t/history", [], None, 403),
    ("state 403", OTHER, "GET", "/v1/sessions/t/state", [], None, 403),
    ("import 403", READ, "PUT", "/v1/sessions/imported/state", [BINCT], STATE2, 403),
    ("events 403", OTHER, "GET", "/v1/sessions/t/events?live=false", [], None, 403),
    ("checkpoints 403", OTHER, "GET", "/v1/sessions/tt/checkpoints", [], None, 403),
    ("label 403", STEP, "POST", "/v1/sessions/tt/checkpoints", [JSONCT], '{"label":"y"}', 403),
    ("rollback 403", STEP, "POST", "/v1/sessions/tt/rollback", [JSONCT], '{"step":1}', 403),
    ("export 403", OTHER, "GET", "/v1/sessions/tt/export", [], None, 403),
    ("import export 403", READ, "PUT", "/v1/sessions/ty/export", [BINCT], STATE2, 403),
    ("delete 403", STEP, "DELETE", "/v1/sessions/t", [], None, 403),
    # Quotas: one session of at most 2 params.
    ("create by quota token", QUOTA, "PUT", "/v1/sessions/q1", [JSONCT],
     '{"optimizer":{"type":"sgd","lr":0.1},"params":[1]}', 201),
    ("create 429", QUOTA, "PUT", "/v1/sessions/q2", [JSONCT],
     '{"optimizer":{"type":"sgd","lr":0.1},"params":[1]}', 429),
    ("import 429", QUOTA, "PUT", "/v1/sessions/q3/state", [BINCT], STATE2, 429),
    ("import export 429", QUOTA, "PUT", "/v1/sessions/q4/export", [BINCT], STATE2, 429),
    ("created by token", QUOTA, "GET", "/v1/sessions/q1", [], None, 200),
    # The token routes: the admin key only.
    ("mint", KEY, "POST", "/v1/tokens", [JSONCT],
     '{"scopes":["read","step"],"prefix":"run42-","label":"ci","expires_in":3600,'
     '"quotas":{"max_sessions":4,"max_params":1000,"steps_per_second":10,"burst":20}}', 201),
    ("mint at", KEY, "POST", "/v1/tokens", [JSONCT],
     '{"scopes":["admin"],"expires_at":"2099-01-01T00:00:00Z"}', 201),
    ("mint bad scope", KEY, "POST", "/v1/tokens", [JSONCT], '{"scopes":["write"]}', 400),
    ("mint 401", ANON, "POST", "/v1/tokens", [JSONCT], '{"scopes":["read"]}', 401),
    ("mint 403", ADMIN, "POST", "/v1/tokens", [JSONCT], '{"scopes":["read"]}', 403),
    ("mint 406", KEY, "POST", "/v1/tokens", [JSONCT, BINACC], '{"scopes":["read"]}', 406),
    ("mint 415", KEY, "POST", "/v1/tokens", [TEXTCT], '{"scopes":["read"]}', 415),
    ("mint huge body", KEY, "POST", "/v1/tokens", [JSONCT, EXPECT100], BIG, 413),
    ("mint 409", OFF, "POST", "/v1/tokens", [JSONCT], '{"scopes":["read"]}', 409),
    ("tokens", KEY, "GET", "/v1/tokens", [], None, 200),
    ("tokens 401", ANON, "GET", "/v1/tokens", [], None, 401),
    ("tokens 403", ADMIN, "GET", "/v1/tokens", [], None, 403),
    ("tokens 406", KEY, "GET", "/v1/tokens", [BINACC], None, 406),
    ("tokens 409", OFF, "GET", "/v1/tokens", [], None, 409),
    ("token", KEY, "GET", "/v1/tokens/{quota}", [], None, 200),
    ("token 404", KEY, "GET", "/v1/tokens/0123456789abcdef", [], None, 404),
    ("token bad id", KEY, "GET", "/v1/tokens/bad!id", [], None, 400),
    ("token 401", ANON, "GET", "/v1/tokens/{quota}", [], None, 401),
    ("token 403", ADMIN, "GET", "/v1/tokens/{quota}", [], None, 403),
    ("token 406", KEY, "GET", "/v1/tokens/{quota}", [BINACC], None, 406),
    ("token 409", OFF, "GET", "/v1/tokens/0123456789abcdef", [], None, 409),
    ("revoke 401", ANON, "DELETE", "/v1/tokens/{other}", [], None, 401),
    ("revoke 403", ADMIN, "DELETE", "/v1/tokens/{other}", [], None, 403),
    ("revoke 406", KEY, "DELETE", "/v1/tokens/{other}", [TEXTACC], None, 406),
    ("revoke bad id", KEY, "DELETE", "/v1/tokens/bad!id", [], None, 400),
    ("revoke 404", KEY, "DELETE", "/v1/tokens/0123456789abcdef", [], None, 404),
    ("revoke 409", OFF, "DELETE", "/v1/tokens/0123456789abcdef", [], None, 409),
    ("revoke", KEY, "DELETE", "/v1/tokens/{other}", [], None, 204),
    ("revoked token 401", OTHER, "GET", "/v1/sessions", [], None, 401),

    ("delete 406", KEY, "DELETE", "/v1/sessions/t", [TEXTACC], None, 406),
    ("delete 401", ANON, "DELETE", "/v1/sessions/t", [], None, 401),
    ("delete bad name", KEY, "DELETE", "/v1/sessions/bad!name", [], None, 400),
    ("delete", KEY, "DELETE", "/v1/sessions/t", [], None, 204),
    ("delete again", KEY, "DELETE", "/v1/sessions/t", [], None, 404),
]


def body_bytes(body):
    return body.encode() if isinstance(body, str) else body


class Contract(unittest.TestCase):
    maxDiff = None

    @classmethod
    def setUpClass(cls):
        cls.d = Daemon(["--api-key", API_KEY, "--max-body-mb", str(MAX_BODY_MB),
                        "--max-params", "100000"])
        cls.off = Daemon(["--max-body-mb", str(MAX_BODY_MB)])
        cls.tokens, cls.token_ids = {}, {}
        for role, body in TOKEN_ROLES.items():
            r = cls.d.request("POST", "/v1/tokens", [JSONCT], body.encode())
            if r.status != 201:
                raise AssertionError("minting %s: %d %r" % (role, r.status, r.body))
            cls.tokens[role] = r.json()["token"]
            cls.token_ids[role] = r.json()["id"]

    @classmethod
    def tearDownClass(cls):
        cls.off.stop()
        rc = cls.d.stop()
        if rc != 0:
            raise AssertionError("optd exited %d" % rc)

    # ------------------------------------------------------ helpers

    def check_answer(self, o, label, r):
        """Every check of one real answer against what the spec says of
        (operation, status)."""
        resp = o.response(r.status)
        if resp is None:
            self.fail("%s: %s %s answered %d, which the spec does not document (it has: %s): "
                      "%.300s" % (label, o.method, o.path, r.status,
                                  " ".join(o.op["responses"]), r.body))
        content = resp.get("content")
        if not content:
            self.assertEqual(r.body, b"", "%s: %d has a body, the spec documents none"
                             % (label, r.status))
        else:
            mt = r.content_type.split(";")[0].strip()
            media = content.get(mt)
            if media is None:
                self.fail("%s: Content-Type %r is not documented for %s %s %d"
                          % (label, r.content_type, o.method, o.path, r.status))
            if mt in ("application/json", "application/problem+json"):
                assert_valid(self, media["schema"], r.json(),
                             "%s (%s %s %d)" % (label, o.method, o.path, r.status))
        if r.status >= 400:
            self.assertTrue(r.content_type.startswith("application/problem+json"),
                            "%s: error %d is %s" % (label, r.status, r.content_type))
            doc = r.json()
            assert_valid(self, {"$ref": "#/components/schemas/Problem"}, doc, label)
            self.assertEqual(doc["status"], r.status)
            self.assertEqual(doc["type"], TABLE["problem_types"][str(r.status)])
        hdrs = resp.get("headers") or {}
        for name, h in hdrs.items():
            if deref(h).get("required") and r.header(name) is None:
                self.fail("%s: %d lacks the required header %s" % (label, r.status, name))
        named = {n.lower() for n in hdrs}
        for name, _ in r.headers:
            if name.lower().startswith("optd-") and name.lower() not in named:
                self.fail("%s: %d carries %s, which the spec does not name for %s %s %d"
                          % (label, r.status, name, o.method, o.path, r.status))
        return resp

    def create(self, name, body):
        r = self.d.request("PUT", "/v1/sessions/" + name, [JSONCT], body.encode())
        self.assertEqual(r.status, 201, r.body)

    # ------------------------------------------------ 0: the tools bite

    def test_validator_refuses_what_the_spec_forbids(self):
        cases = [
            ("Problem", '{"type":"urn:optd:problem:conflict","title":"Conflict","status":409,'
                        '"detail":"x","field":"base_step","step":3}', True),
            ("Problem", '{"type":"urn:optd:problem:conflict","title":"C","status":409}', False),
            ("Problem", '{"type":"urn:optd:problem:nope","title":"C","status":409,"detail":"x"}',
             False),
            ("Problem", '{"type":"urn:optd:problem:conflict","title":"C","status":409,'
                        '"detail":"x","extra":1}', False),
            ("Problem", '{"type":"urn:optd:problem:conflict","title":"C","status":200,'
                        '"detail":"x"}', False),
            ("StepResult", '{"step":1,"lr":0.1,"params":[1,null]}', True),
            ("StepResult", '{"step":-1}', False),
            ("StepResult", '{"step":1.5}', False),
            ("StepResult", '{"step":1,"replayed":false}', False),
            ("StepResult", '{"step":1,"params":["1"]}', False),
            ("HistoryEntry", '{"step":1,"time":"2026-01-31T12:00:00.000Z","lr":0.1,'
                             '"loss":null,"grad_norm":1,"update_norm":0.1}', True),
            ("HistoryEntry", '{"step":1,"time":"yesterday","lr":0.1,"loss":null,'
                             '"grad_norm":1,"update_norm":0.1}', False),
            ("SessionSummary", '{"name":"bad name","step":0,"optimizer":"sgd",'
                               '"dtype":"float32","size":1,'
                               '"created_at":"2026-01-31T12:00:00.000Z",'
                               '"updated_at":"2026-01-31T12:00:00.000Z"}', False),
            ("Clip", '{"type":"norm","max_norm":1,"norm_type":"inf"}', True),
            ("Clip", '{"type":"norm","max_norm":1,"norm_type":2}', True),
            ("Clip", '{"type":"norm","max_norm":1,"norm_type":3}', False),
            ("Clip", '{"type":"value","max_value":0}', False),
            ("Optimizer", '{"type":"sgd","lr":0.1}', True),
            ("Optimizer", '{"type":"sgd"}', False),
            ("Optimizer", '{"type":"adam","momentum":0.9}', False),
            ("Optimizer", '{"type":"adam","betas":[0.9,1.0]}', False),
            ("Optimizer", '{"type":"adamx"}', False),
            ("Schedule", '{"type":"cosine","T_max":10}', True),
            ("Schedule", '{"type":"cosine"}', False),
            ("Mode", '{"type":"async","accumulate":0}', False),
            ("Mode", '{"type":"sync","workers":4,"reduce":"sum"}', True),
            ("Health", '{"status":"ok","hot_sessions":0}', True),
            ("Health", '{"status":"bad","hot_sessions":0}', False),
        ]
        for name, text, ok in cases:
            errs = errors_of({"$ref": "#/components/schemas/" + name}, json.loads(text))
            self.assertEqual(not errs, ok, "%s %s: %s" % (name, text,
                                                          [e.message for e in errs]))

    def test_every_schema_keyword_is_enforced_or_an_annotation(self):
        seen = []
        for where, s in all_schemas():
            schema_keywords(s, where, seen)
            Validator.check_schema(s)
        unknown = sorted({"%s (%s)" % (k, w) for k, w in seen
                          if k not in ENFORCED and k not in ANNOTATIONS})
        self.assertEqual(unknown, [], "schema keywords nothing enforces")
        used = set()

        def walk(n):
            if isinstance(n, dict):
                if isinstance(n.get("format"), str):
                    used.add(n["format"])
                for v in n.values():
                    walk(v)
            elif isinstance(n, list):
                for v in n:
                    walk(v)
        walk(SPEC)
        self.assertLessEqual(used, set(FORMATS.checkers), "formats nothing checks")

    # ------------------------------------------------ 1: the spec alone

    def test_spec_reads_and_is_regular(self):
        self.assertEqual(SPEC["openapi"], "3.1.0")
        self.assertTrue(SPEC["info"]["version"])

        def walk_refs(n, where):
            if isinstance(n, dict):
                for k, v in n.items():
                    if k == "$ref":
                        ref(v)
                    walk_refs(v, where + "/" + k)
            elif isinstance(n, list):
                for i, v in enumerate(n):
                    walk_refs(v, "%s[%d]" % (where, i))
        walk_refs(SPEC, "")

        # The layout the header comment promises small parsers: "  /v1/...:"
        # path lines and "    get:" method lines under paths:.
        path_lines = method_lines = 0
        in_paths = False
        for line in SPEC_TEXT.split("\n"):
            if line and line[0] not in " #":
                in_paths = line == "paths:"
            elif in_paths and line.startswith("  /") and line.endswith(":"):
                path_lines += 1
            elif in_paths and re.match(r"^    (%s):$" % "|".join(METHODS), line):
                method_lines += 1
        self.assertEqual(path_lines, len(SPEC["paths"]))
        self.assertEqual(method_lines, len(OPS))

        problem = ref("#/components/schemas/Problem")
        ids = set()
        for o in OPS:
            where = "%s %s" % (o.method, o.path)
            oid = o.op.get("operationId")
            self.assertTrue(oid, where + " has no operationId")
            self.assertNotIn(oid, ids, "operationId %s is used twice" % oid)
            ids.add(oid)
            for param in re.findall(r"\{([^}]*)\}", o.path):
                declared = any(
                    deref(p).get("name") == param and deref(p).get("in") == "path"
                    and deref(p).get("required") is True
                    for p in o.op.get("parameters", []) + o.item.get("parameters", []))
                self.assertTrue(declared, "%s: path parameter %s is not declared" % (where, param))
            responses = o.op.get("responses") or {}
            self.assertTrue(responses, where + " documents no responses")
            for code, r in responses.items():
                self.assertRegex(str(code), r"^[0-9]{3}$", where)
                r = deref(r)
                self.assertTrue(r.get("description"), "%s %s: no description" % (where, code))
                if str(code)[0] in "45":
                    content = r.get("content") or {}
                    self.assertEqual(list(content), ["application/problem+json"],
                                     "%s %s: an error must be application/problem+json only"
                                     % (where, code))
                    self.assertIs(deref(content["application/problem+json"]["schema"]), problem,
                                  "%s %s: an error's schema must be Problem" % (where, code))
            self.assertTrue(any(str(c).startswith("2") for c in responses),
                            where + " documents no success")

    def test_spec_paths_equal_route_table(self):
        kinds = TABLE["body_kinds"]
        for rt in TABLE["routes"]:
            where = "%s %s" % (rt["method"], rt["pattern"])
            o = spec_find(rt["method"], rt["pattern"])
            self.assertIsNotNone(o, "route %s is served but not in api/openapi.yaml" % where)
            sec = o.op.get("security", SPEC.get("security"))
            spec_auth = bool(sec)
            self.assertEqual(spec_auth, rt["scope"] != 0,
                             "%s: auth in the spec and the table" % where)
            self.assertEqual(o.op.get("x-optd-scope"), SCOPE_NAMES[rt["scope"]],
                             "%s: x-optd-scope in the spec and the scope in the table" % where)
            body = o.op.get("requestBody")
            content = deref(body).get("content", {}) if body else {}
            if rt["body"] == kinds["none"]:
                self.assertIsNone(body, "%s takes no body; the spec documents one" % where)
            elif rt["body"] == kinds["json"]:
                self.assertEqual(set(content), {"application/json"},
                                 "%s reads JSON only" % where)
            elif rt["body"] == kinds["binary"]:
                self.assertEqual(set(content), {"application/octet-stream"},
                                 "%s reads octet-stream only" % where)
            else:
                self.assertEqual(set(content), {"application/json", "application/octet-stream"},
                                 "%s reads JSON or octet-stream" % where)
            if body:
                self.assertIs(deref(body).get("required"), True,
                              "%s: the body is required (400 without one)" % where)
        served = {(rt["method"], rt["pattern"]) for rt in TABLE["routes"]}
        documented = [(o.method, o.path) for o in OPS]
        self.assertEqual(len(documented), len(set(documented)), "an operation documented twice")
        self.assertEqual(set(documented), served)
        self.assertEqual(len(OPS), len(TABLE["routes"]))

    # ------------------------------------ 2: the daemon against the spec

    def test_operations_answer_documented_statuses(self):
        driven_ok = set()
        seen = set()
        for label, who, method, path, headers, body, expect in SCENARIOS:
            # "{role}" in a path is that token's id.
            path = re.sub(r"\{([a-z]+)\}", lambda m: self.token_ids[m.group(1)], path)
            o = spec_match(method, path)
            self.assertIsNotNone(o, "%s: %s %s matches no operation" % (label, method, path))
            daemon = self.off if who == OFF else self.d
            key = who if isinstance(who, bool) else False if who == OFF else self.tokens[who]
            r = daemon.request(method, path, headers,
                               None if body is None else body_bytes(body), key=key)
            self.assertEqual(r.status, expect, "%s: %s %s: %.400s" % (label, method, path, r.body))
            self.check_answer(o, label, r)
            seen.add((o.method, o.path, str(r.status)))
            if r.status < 300:
                driven_ok.add((o.method, o.path))
                if isinstance(body, str) and body:
                    # The spec accepts what the daemon accepts.
                    rb = o.op.get("requestBody")
                    media = deref(rb).get("content", {}).get("application/json") if rb else None
                    self.assertIsNotNone(media, "%s: a JSON body for %s %s, which documents none"
                                         % (label, o.method, o.path))
                    assert_valid(self, media["schema"], json.loads(body),
                                 label + ": request body against the spec")
        missed = []
        pairs = 0
        for o in OPS:
            self.assertIn((o.method, o.path), driven_ok,
                          "%s %s was never driven with a valid request" % (o.method, o.path))
            for code in o.op["responses"]:
                pairs += 1
                # 503 needs a storage fault (tests/test_api_durability.c).
                if (o.method, o.path, str(code)) not in seen and str(code) != "503":
                    missed.append("%s %s %s" % (o.method, o.path, code))
        self.assertEqual(missed, [], "documented but not driven")
        print("\n  %d requests; %d of %d documented (operation, status) pairs driven"
              % (len(SCENARIOS), len(seen), pairs))

    def test_other_methods_answer_405_with_allow(self):
        m405 = ref("#/components/responses/MethodNotAllowed")
        self.create("allow", '{"optimizer":{"type":"sgd","lr":1},"params":[1]}')
        for p in SPEC["paths"]:
            path = re.sub(r"\{[^}]*\}", "allow", p)
            for probe in ("POST", "DELETE", "PATCH"):
                if spec_find(probe, p):
                    continue
                r = self.d.request(probe, path)
                self.assertEqual(r.status, 405, "%s %s" % (probe, path))
                allow = r.header("Allow")
                self.assertIsNotNone(allow, "%s %s: 405 without Allow" % (probe, path))
                listed = {m.strip() for m in allow.split(",")}
                documented = {m.upper() for m in METHODS if spec_find(m.upper(), p)}
                # HEAD is served wherever GET is, OPTIONS everywhere (the
                # spec's info.description).
                if "GET" in documented:
                    documented.add("HEAD")
                self.assertTrue(documented)
                documented.add("OPTIONS")
                self.assertEqual(listed, documented, "%s: Allow and the spec" % p)
                for h in m405.get("headers", {}):
                    self.assertIsNotNone(r.header(h), "405 lacks %s" % h)
                doc = r.json()
                self.assertEqual(doc["status"], 405)
                assert_valid(self, m405["content"]["application/problem+json"]["schema"], doc,
                             "405")
            # OPTIONS, without the key: 204 and the same Allow.
            documented = {m.upper() for m in METHODS if spec_find(m.upper(), p)}
            documented |= {"OPTIONS"} | ({"HEAD"} if "GET" in documented else set())
            r = self.d.request("OPTIONS", path, key=False)
            self.assertEqual(r.status, 204, "OPTIONS %s" % path)
            self.assertEqual({m.strip() for m in (r.header("Allow") or "").split(",")},
                             documented, "OPTIONS %s: Allow and the spec" % p)
            self.assertEqual(r.body, b"")
        r = self.d.request("GET", "/v1/nowhere")
        self.assertEqual(r.status, 404)
        assert_valid(self, {"$ref": "#/components/schemas/Problem"}, r.json(), "404 unknown path")

    # ------------------------------------------ 3: step headers, both ways

    def test_step_response_headers(self):
        o = spec_find("POST", "/v1/sessions/{name}/step")
        self.create("h", '{"optimizer":{"type":"adam","lr":0.01},"size":3}')
        self.create("hacc", '{"optimizer":{"type":"sgd","lr":0.1},"size":3,'
                            '"mode":{"type":"async","accumulate":2},"nonfinite":"skip"}')
        self.create("hsync", '{"optimizer":{"type":"sgd","lr":0.1},"size":3,'
                             '"mode":{"type":"sync","workers":1,"accumulate":2}}')
        g = struct.pack("<3f", 0.1, 0.2, -0.3)
        bad = struct.pack("<3f", 0.1, math.nan, 0.0)
        hj = [JSONCT, "Idempotency-Key: hk-1"]
        hb = [BINCT, BINACC]
        hs = [BINCT, BINACC, "Optd-Worker: w"]
        step = "/v1/sessions/%s/step"
        answers = [
            ("applied (JSON)", 200, ("h", hj, b'{"grad":[0.1,0.2,-0.3]}')),
            ("applied (binary)", 200, ("h", hb, g)),
            ("replayed", 200, ("h", hj, b'{"grad":[0.1,0.2,-0.3]}')),
            ("accumulated", 202, ("hacc", hb, g)),
            ("accumulated to an update", 200, ("hacc", hb, g)),
            ("skipped", 200, ("hacc", hb, bad)),
            ("sync round accumulated", 202, ("hsync", hs, g)),
            ("sync round applied", 200, ("hsync", hs, g)),
        ]
        ans = []
        for what, want, (name, headers, body) in answers:
            r = self.d.request("POST", step % name, headers, body)
            self.assertEqual(r.status, want, "%s: %.300s" % (what, r.body))
            self.check_answer(o, what, r)
            ans.append(r)
        for r in ans[:2]:
            self.assertIsNotNone(r.header("Optd-Step"))
            self.assertIsNotNone(r.header("Optd-Lr"))
        doc = ans[0].json()
        self.assertEqual(int(ans[0].header("Optd-Step")), doc["step"])
        self.assertEqual(float(ans[0].header("Optd-Lr")), doc["lr"])
        self.assertEqual(int(ans[1].header("Optd-Step")), 2)
        self.assertEqual(len(ans[1].body), len(g))
        self.assertIsNotNone(ans[2].header("Optd-Replayed"))
        self.assertEqual(int(ans[2].header("Optd-Step")), 1)
        self.assertIsNotNone(ans[3].header("Optd-Pending"))
        self.assertIsNotNone(ans[5].header("Optd-Skipped"))
        self.assertIsNone(ans[5].header("Optd-Lr"))
        self.assertIsNotNone(ans[6].header("Optd-Round-Size"))
        self.assertIsNotNone(ans[7].header("Optd-Round-Size"))
        self.assertIsNotNone(ans[7].header("Optd-Lr"))
        # Every Optd-* header the spec names for step shows up in a real
        # step answer of that status (check_answer did the converse).
        named = 0
        for code, resp in o.op["responses"].items():
            for h in (deref(resp).get("headers") or {}):
                if not h.lower().startswith("optd-"):
                    continue
                named += 1
                self.assertTrue(any(r.status == int(code) and r.header(h) is not None
                                    for r in ans),
                                "the spec names %s for step %s; no real answer carried it"
                                % (h, code))
        self.assertGreaterEqual(named, 6)

    def test_step_header_parameters(self):
        """The step's header parameters are the ones the daemon reads: each
        example is accepted and lands where it should, and a value outside
        each schema is refused naming that header, changing nothing."""
        o = spec_find("POST", "/v1/sessions/{name}/step")
        self.create("hp", '{"optimizer":{"type":"sgd","lr":0.5},"size":2}')
        g = struct.pack("<2f", 1.0, -1.0)
        path = "/v1/sessions/hp/step"
        headers = [BINCT]
        examples = {}
        for p in o.op.get("parameters", []):
            pd = deref(p)
            if pd.get("in") != "header":
                continue
            name, ex = pd.get("name"), pd.get("example")
            self.assertTrue(name and ex is not None, "header parameter %s: name and example" % name)
            ex = str(ex)
            # The layout headers name tensors and groups this two-element,
            # one-group session does not have: each is refused below, and
            # driven for real by tests/test_layout.c.
            if name != "Optd-Absent" and not name.startswith("Optd-Group-"):
                headers.append("%s: %s" % (name, ex))
            examples[name] = ex
            sc = deref(pd["schema"])
            if "maxLength" in sc:
                badv = "k" * (sc["maxLength"] + 1)
            elif sc.get("type") == "integer" and "minimum" in sc:
                badv = "%d" % (sc["minimum"] - 1)
            elif sc.get("type") == "number":
                badv = "not-a-number"
            elif sc.get("type") == "string" and "enum" in sc:
                badv = "not-one-of-the-enum"
            elif sc.get("type") == "string" and "pattern" in sc:
                badv = "@not-matching@"
                self.assertIsNone(re.search(sc["pattern"], badv))
            else:
                self.fail("header parameter %s: no way to make a value its schema refuses" % name)
            bads = [badv]
            if sc.get("type") == "number" and "minimum" in sc:
                bads.append("%r" % (sc["minimum"] - 0.5))
            for badv in bads:
                before = self.d.snapshot("hp")
                r = self.d.request("POST", path, [BINCT, "%s: %s" % (name, badv)], g)
                self.assertEqual(r.status, 400, "%s: %.40s..." % (name, badv))
                self.assertEqual(r.json().get("field"), name)
                self.check_answer(o, name, r)
                self.assertEqual(self.d.snapshot("hp"), before,
                                 name + ": the refusal changed state")
        for need in ("Optd-Loss", "Optd-Worker", "Idempotency-Key"):
            self.assertIn(need, examples)
        r = self.d.request("POST", path, headers, g)
        self.assertEqual(r.status, 200, "every documented header at its example: %.300s" % r.body)
        self.check_answer(o, "header examples", r)
        r = self.d.request("POST", path, headers, g)
        self.assertEqual(r.status, 200)
        self.assertIsNotNone(r.header("Optd-Replayed"), "the key was read")
        steps = self.d.request("GET", "/v1/sessions/hp/history").json()["steps"]
        self.assertEqual(len(steps), 1)
        self.assertEqual(steps[0]["worker"], examples["Optd-Worker"])
        self.assertEqual(steps[0]["loss"], float(examples["Optd-Loss"]))

    # ---------------------------------- 4: the catalogue against the schemas

    def check_kind(self, family, entry, schema):
        typ = entry["type"]
        props = schema.get("properties")
        self.assertTrue(props, "%s %s: the schema has no properties" % (family, typ))
        self.assertEqual(props["type"].get("const"), typ,
                         "%s %s: the schema's type const" % (family, typ))
        self.assertIs(schema.get("additionalProperties"), False,
                      "%s %s: the schema must refuse unknown members, as the daemon does"
                      % (family, typ))
        required = set(schema.get("required", []))
        n_cat = 0
        for hp in entry.get("hyperparameters", []):
            n_cat += 1
            name = hp["name"]
            self.assertIn(name, props, "%s %s: the catalogue has %s, the schema not"
                          % (family, typ, name))
            prop = props[name]
            self.assertEqual(bool(hp.get("required")), name in required,
                             "%s %s.%s: required in one only" % (family, typ, name))
            if "default" in hp:
                spec_default = prop.get("default", deref(prop).get("default"))
                self.assertTrue(json_equal(hp["default"], spec_default),
                                "%s %s.%s: the catalogue's default %r differs from the spec's %r"
                                % (family, typ, name, hp["default"], spec_default))
                assert_valid(self, prop, hp["default"], "%s %s.%s default" % (family, typ, name))
            if "choices" in hp:
                self.assertEqual(hp["choices"], deref(prop).get("enum"),
                                 "%s %s.%s: choices and the spec's enum" % (family, typ, name))
        n_spec = len([p for p in props if p != "type"])
        self.assertEqual(n_spec, n_cat, "%s %s: hyperparameters in the spec and the catalogue"
                         % (family, typ))

    def check_family(self, cat, member, schema_name, type_enum):
        mapping = ref("#/components/schemas/" + schema_name)["discriminator"]["mapping"]
        enum = ref("#/components/schemas/" + type_enum)["enum"] if type_enum else None
        n = 0
        for entry in cat[member]:
            typ = entry["type"]
            self.assertIn(typ, mapping, "%s %s is not in the spec's %s" % (member, typ, schema_name))
            self.check_kind(member, entry, ref(mapping[typ]))
            if enum is not None:
                self.assertIn(typ, enum, "%s %s is missing from %s" % (member, typ, type_enum))
            n += 1
        return n

    def test_catalogue_matches_schemas(self):
        r = self.d.request("GET", "/v1/optimizers")
        self.assertEqual(r.status, 200)
        cat = r.json()
        n_opt = self.check_family(cat, "optimizers", "Optimizer", "OptimizerType")
        self.assertEqual(n_opt, len(ref("#/components/schemas/OptimizerType")["enum"]))
        self.assertEqual(n_opt, len(ref("#/components/schemas/Optimizer")["discriminator"]["mapping"]))
        self.check_family(cat, "schedules", "Schedule", "ScheduleType")
        n_clip = self.check_family(cat, "clips", "Clip", "ClipType")
        self.assertEqual(n_clip, len(ref("#/components/schemas/ClipType")["enum"]))
        self.assertEqual(self.check_family(cat, "modes", "Mode", None), 2)

    # ------------------------------------ 5: problem types and docs/errors.md

    def test_problem_types_documented(self):
        enum = ref("#/components/schemas/Problem")["properties"]["type"]["enum"]
        statuses = {405}
        for o in OPS:
            statuses |= {int(c) for c in o.op["responses"] if 400 <= int(c) < 600}
        for st in sorted(statuses):
            urn = TABLE["problem_types"][str(st)]
            self.assertIn(urn, enum, "status %d answers %s, which Problem.type does not list"
                          % (st, urn))
        with open(ERRORS_DOC, encoding="utf-8") as f:
            doc = f.read()
        for urn in enum:
            self.assertIn("\n## `%s`" % urn, doc, "docs/errors.md has no section for " + urn)


def json_equal(a, b):
    """JSON values equal as JSON (1 == 1.0, but True is not 1)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b))
    return a == b and type(a) is type(b)


if __name__ == "__main__":
    unittest.main()
