package optd

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
)

// WithTLS configures https:// for a daemon started with --tls-cert: the
// daemon's certificate must verify against the PEM bundle caFile ("": the
// system's CAs), and certFile with keyFile (PEM, both or neither) is the
// client certificate a daemon started with --tls-client-ca requires. The
// files are read by NewClient; a file that cannot be read or parsed is
// reported by the first call.
func WithTLS(caFile, certFile, keyFile string) Option {
	return func(c *Client) {
		cfg, err := tlsConfig(caFile, certFile, keyFile)
		if err != nil {
			c.initErr = fmt.Errorf("optd: TLS: %w", err)
			return
		}
		c.tlsConf = cfg
	}
}

// WithTLSConfig uses cfg for https:// (cloned; its RootCAs, Certificates,
// ...). Use it instead of WithTLS for anything WithTLS does not cover.
func WithTLSConfig(cfg *tls.Config) Option {
	return func(c *Client) { c.tlsConf = cfg.Clone() }
}

func tlsConfig(caFile, certFile, keyFile string) (*tls.Config, error) {
	if (certFile == "") != (keyFile == "") {
		return nil, errors.New("certFile and keyFile go together")
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if caFile != "" {
		pem, err := os.ReadFile(caFile)
		if err != nil {
			return nil, err
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("no PEM certificate in %s", caFile)
		}
		cfg.RootCAs = pool
	}
	if certFile != "" {
		pair, err := tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			return nil, err
		}
		cfg.Certificates = []tls.Certificate{pair}
	}
	return cfg, nil
}
