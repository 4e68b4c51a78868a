/*
 * observe.h -- what lets an operator see the daemon work: Prometheus
 * metrics (metrics.c), the live event stream of a session (events.c), the
 * access log and request ids (access_log.c) and the dashboard's embedded
 * files (dashboard.c, with web_assets.c generated from web/ at build time).
 *
 * The rest of the server calls in through small hooks: http.c around each
 * request, handlers.c after a committed step or a config change, the
 * registry on a load or an eviction, sync.c when a round opens or closes.
 * Every hook is cheap when nobody looks: counters are relaxed atomics, and
 * an event is only formatted when its session has a watcher.
 */
#ifndef OBSERVE_H
#define OBSERVE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "server/server.h"

/* Called once before the daemon listens (opens the access log); 0 or -1
 * after logging why. */
int obs_init(srv_ctx *ctx);
/* Ends every event stream (resuming suspended watchers) before the HTTP
 * daemon stops; closes the access log. */
void obs_shutdown(void);
/* After the HTTP daemon stopped: closes the access log. */
void obs_close(void);

/* ------------------------------------------------------------ metrics */

/* Seconds on the monotonic clock. */
double obs_now(void);

/* One finished request: route id (API_R_COUNT: no route matched), status,
 * body bytes in and out, seconds from the request line to the end. */
void obs_request_done(int route, int status, uint64_t bytes_in, uint64_t bytes_out,
                      double seconds);
/* A step request's handler ran from t_begin to t_end (obs_now): with the
 * marks the commit hook left on this thread, splits it into decode
 * (before the engine) and encode (after the commit). */
void obs_step_request(double t_begin, double t_end);
/* A committed step (session locked): phases, kinds, per-session series,
 * and the event for its watchers. */
void obs_step_committed(const eng_session *s, const eng_step_in *in, const eng_step_out *out);
/* A gradient refused as too stale. */
void obs_step_stale(void);
/* A session evicted from memory; a session loaded (replay) in seconds. */
void obs_session_evicted(void);
void obs_session_loaded(double seconds);
/* A synchronous round opened (+1) or closed (-1). */
void obs_rounds_open(int delta);
/* Requests parked in synchronous rounds right now (http.c owns it). */
void obs_set_waiting_source(const int *parked_now);

/* Body bytes sent outside a queued reply (event streams). */
void obs_bytes_out(uint64_t n);
/* Reads --metrics-sessions; 0 or -1 (no memory). */
int obs_metrics_init(const srv_config *cfg);
/* GET /metrics. */
int obs_h_metrics(srv_ctx *ctx, const srv_request *req, api_reply *r);

/* ------------------------------------------------------------- events */

/* After a PATCH: the session's new config for its watchers (session
 * locked). */
void obs_config_changed(const eng_session *s);
/* Queues the event stream of GET /v1/sessions/{name}/events on the MHD
 * connection conn (an opaque struct MHD_Connection *).  The stream starts
 * after step Last-Event-ID (else after the query's "after"; neither: live
 * only); with live=false it ends after the history.  Returns 0 when the
 * stream was queued (*ok: MHD accepted it), else the problem's status with
 * the problem in *r (404 no such session, 400 a bad id, 503). */
int obs_events_open(srv_ctx *ctx, void *conn, const char *name, const char *last_event_id,
                    const char *after, const char *live, const char *request_id, int *ok,
                    api_reply *r);
/* A synchronous round for the session's watchers (session locked):
 * state "open" after a gradient joined it, "aborted" or "timed_out" when
 * it ends without an update (its closing update is a step event). */
void obs_events_round(const eng_session *s, const char *state);
/* Starts / stops the keepalive thread; the stop ends every stream. */
int obs_events_init(srv_ctx *ctx);
void obs_events_shutdown(void);
/* A committed step for the session's watchers (session locked). */
void obs_events_step(const eng_session *s, const eng_step_in *in, const eng_step_out *out);
/* Watchers attached right now; streams dropped for reading too slowly. */
size_t obs_events_watchers(void);
uint64_t obs_events_dropped(void);

/* The stream route's entry in the handler table: http.c serves it itself
 * (obs_events_open); this answers 500 if it is ever reached. */
int obs_h_events(srv_ctx *ctx, const srv_request *req, api_reply *r);

/* ------------------------------------------------- access log, ids */

#define OBS_RID_MAX 64
/* The request's id: the client's X-Request-Id when it is 1-64 characters
 * of A-Z a-z 0-9 . _ - : (others are replaced), else a new random one. */
void obs_request_id(const char *given, char out[OBS_RID_MAX + 1]);
/* One JSON line to the --access-log file (nothing when there is none). */
void obs_access_log(const char *rid, const char *method, const char *route, const char *session,
                    int status, uint64_t bytes_in, uint64_t bytes_out, double seconds);

/* ---------------------------------------------------------- dashboard */

/* GET / and GET /assets/{name}. */
int obs_h_dashboard(srv_ctx *ctx, const srv_request *req, api_reply *r);
int obs_h_asset(srv_ctx *ctx, const srv_request *req, api_reply *r);

/* web_assets.c (generated): the files of web/. */
typedef struct {
    const char *name;
    const char *type;
    const unsigned char *data;
    size_t len;
} obs_asset;
extern const obs_asset obs_assets[];
extern const size_t obs_asset_count;

#endif /* OBSERVE_H */
