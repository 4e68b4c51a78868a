/*
 * auth.h -- who is asking (the admin key, a scoped token, or nobody when
 * authentication is off), what each route asks of them, the tokens
 * themselves (mint, list, revoke) and their quotas.  docs/security.md has
 * the rules; server/auth.c the design notes.
 */
#ifndef SERVER_AUTH_H
#define SERVER_AUTH_H

#include <stdbool.h>
#include <stdint.h>

#include "api/api.h"
#include "server/engine.h"
#include "storage/storage.h"

/* A token id: 16 hex digits (64 random bits). */
#define SRV_TOKEN_ID_LEN 16

enum {
    SRV_WHO_NONE = 0, /* authentication off (no --api-key), or a public route */
    SRV_WHO_ADMIN,    /* the admin key (--api-key)                           */
    SRV_WHO_TOKEN     /* a token minted by the admin key                      */
};

typedef struct srv_principal {
    int kind;                          /* SRV_WHO_*                          */
    int scope;                         /* API_SCOPE_* held                   */
    char id[SRV_TOKEN_ID_LEN + 1];     /* the token's id ("" otherwise)      */
    char prefix[API_NAME_MAX + 1];     /* session names it may touch ("": all) */
} srv_principal;

/* Returned by srv_auth_create when the creator's quota refused the
 * session (the reply holds the 429). */
#define SRV_EQUOTA (-1000)

/* Loads the token key (key_path, created 0600 with 32 random bytes when
 * absent) and the tokens of db.  Only with an admin key: without one,
 * authentication is off and tokens are not used.  0, or -1 after logging
 * why. */
int srv_auth_open(storage *db, const char *api_key, const char *key_path);
void srv_auth_close(void);

/* The authentication and authorisation step of a request, before its body
 * is read: fills *who and returns 0, or fills r (401 with WWW-Authenticate,
 * 403 naming the missing scope or the prefix, 409 for the token routes
 * without an admin key, 429 with Retry-After past a token's step rate) and
 * returns its status.  name: the route's {name} ("" when none). */
int srv_auth_check(const char *api_key, const char *metrics_token, const api_route *route,
                   const char *name, const char *authorization, srv_principal *who,
                   api_reply *r);

/* May who touch the session name?  (Its prefix; NULL who: yes.) */
bool srv_auth_name_ok(const srv_principal *who, const char *name);

/* Creates s in storage (eng_session_create) on behalf of who: records the
 * creator in s->created_by (token id, "admin", or nothing) and holds the
 * token's max_sessions / max_params quotas, checked and created under one
 * lock so that concurrent creates cannot pass them together.  Returns
 * ENG_OK, an engine/storage error, or SRV_EQUOTA with r holding the 429.
 * The session must be locked by the caller or not yet shared. */
int srv_auth_create(storage *db, const srv_principal *who, eng_session *s, int64_t now_ms,
                    api_reply *r);

/* The token routes (admin key only).  name: the token id of /v1/tokens/{id}. */
int srv_auth_tokens_list(storage *db, api_reply *r);
int srv_auth_tokens_post(storage *db, const char *body, size_t len, api_reply *r);
int srv_auth_token_get(storage *db, const char *id, api_reply *r);
int srv_auth_token_delete(storage *db, const char *id, api_reply *r);

#endif /* SERVER_AUTH_H */
