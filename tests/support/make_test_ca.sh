#!/bin/sh
# make_test_ca.sh DIR -- the certificates the TLS tests use, made with
# GnuTLS's certtool (Debian: gnutls-bin) in DIR (created), never committed:
#   ca.pem ca.key                 a test CA
#   server.pem server.key         signed by ca.pem for 127.0.0.1, ::1 and localhost
#   client.pem client.key         a TLS client certificate signed by ca.pem
#   other-ca.pem other-ca.key     a second CA, unrelated to the first
#   other-server.pem .key         signed by other-ca.pem (a rotated server certificate)
#   other-client.pem .key         a client certificate signed by other-ca.pem
# ECDSA P-256 keys: quick to make.  Exit status 0, or 1 with why on stderr.
set -eu
dir=${1:?usage: make_test_ca.sh DIR}
command -v certtool >/dev/null 2>&1 || {
    echo "make_test_ca.sh: certtool not found (apt-get install gnutls-bin)" >&2
    exit 1
}
mkdir -p "$dir"
cd "$dir"

key() { certtool --generate-privkey --key-type=ecdsa --curve=secp256r1 --outfile "$1" 2>/dev/null; }

# ca NAME CN
ca() {
    key "$1.key"
    cat >"$1.tmpl" <<T
cn = "$2"
organization = "optd tests"
serial = $(date +%s%N | cut -c1-15)
expiration_days = 2
ca
cert_signing_key
crl_signing_key
T
    certtool --generate-self-signed --load-privkey "$1.key" --template "$1.tmpl" \
        --outfile "$1.pem" 2>/dev/null
}

# leaf NAME CA ROLE(server|client) CN
leaf() {
    key "$1.key"
    {
        echo "cn = \"$4\""
        echo "organization = \"optd tests\""
        echo "serial = $(date +%s%N | cut -c1-15)"
        echo "expiration_days = 2"
        echo "signing_key"
        if [ "$3" = server ]; then
            echo "tls_www_server"
            echo "encryption_key"
            echo "ip_address = 127.0.0.1"
            echo "ip_address = ::1"
            echo "dns_name = localhost"
        else
            echo "tls_www_client"
        fi
    } >"$1.tmpl"
    certtool --generate-certificate --load-privkey "$1.key" --load-ca-certificate "$2.pem" \
        --load-ca-privkey "$2.key" --template "$1.tmpl" --outfile "$1.pem" 2>/dev/null
}

ca ca "optd test CA"
leaf server ca server "optd test server"
leaf client ca client "optd test client"
ca other-ca "optd other test CA"
leaf other-server other-ca server "optd other test server"
leaf other-client other-ca client "optd other test client"
rm -f ./*.tmpl
chmod 600 ./*.key
