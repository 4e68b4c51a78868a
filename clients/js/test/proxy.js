// A TCP proxy in front of a real daemon that injects network faults, one per
// request, in the order queued: the client's retry path meets the faults a
// real network or load balancer produces.  Each connection carries one
// request (the proxy asks the daemon for Connection: close and closes after
// the answer), so a client's keep-alive pool cannot slip past the queue.
//   'pass'  forward both ways
//   'drop'  forward the request, then cut the connection as the answer
//           starts: the daemon did the work, the client never hears of it
//   'reset' cut the connection without forwarding the request
//   'hang'  never answer
//   '503'   answer 503 problem+json (an overloaded front end) and close
import net from 'node:net';

/** Reads one HTTP/1.1 request (head + Content-Length body) off `sock`. */
function readRequest(sock, onRequest) {
  let buf = Buffer.alloc(0);
  const onData = (d) => {
    buf = Buffer.concat([buf, d]);
    const end = buf.indexOf('\r\n\r\n');
    if (end < 0) return;
    const head = buf.subarray(0, end).toString('latin1');
    const m = /\r\ncontent-length:\s*(\d+)/i.exec(head);
    const need = end + 4 + (m ? Number(m[1]) : 0);
    if (buf.length < need) return;
    sock.off('data', onData);
    onRequest(buf);
  };
  sock.on('data', onData);
}

/** The request with its Connection header replaced by "close". */
function oneShot(req) {
  const end = req.indexOf('\r\n\r\n');
  const lines = req
    .subarray(0, end)
    .toString('latin1')
    .split('\r\n')
    .filter((l) => !/^connection:/i.test(l));
  lines.push('Connection: close');
  return Buffer.concat([Buffer.from(lines.join('\r\n'), 'latin1'), req.subarray(end)]);
}

export async function startProxy(upstreamUrl) {
  const up = new URL(upstreamUrl);
  const faults = [];
  const sockets = new Set();
  const stats = { connections: 0, requests: 0 };
  const server = net.createServer((client) => {
    sockets.add(client);
    client.on('close', () => sockets.delete(client));
    client.on('error', () => {});
    stats.connections++;
    // The fault is taken when a request arrives, not when a connection
    // opens: a client may open connections ahead of need.
    readRequest(client, (req) => {
      stats.requests++;
      const mode = faults.shift() ?? 'pass';
      if (mode === 'reset') {
        client.destroy();
        return;
      }
      if (mode === 'hang') return;
      if (mode === '503') {
        const body = JSON.stringify({
          type: 'urn:optd:problem:unavailable',
          title: 'Service Unavailable',
          status: 503,
          detail: 'injected by the test proxy',
        });
        client.end(
          'HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/problem+json\r\n' +
            `Connection: close\r\nContent-Length: ${Buffer.byteLength(body)}\r\n\r\n${body}`,
        );
        return;
      }
      const upstream = net.connect(Number(up.port), up.hostname);
      sockets.add(upstream);
      upstream.on('close', () => sockets.delete(upstream));
      upstream.on('error', () => client.destroy());
      client.on('close', () => upstream.destroy());
      upstream.write(oneShot(req));
      if (mode === 'drop') {
        upstream.once('data', () => {
          client.destroy();
          upstream.destroy();
        });
      } else {
        upstream.pipe(client);
      }
    });
  });
  await new Promise((res) => server.listen(0, '127.0.0.1', res));
  return {
    url: `http://127.0.0.1:${server.address().port}`,
    stats,
    /** Faults queued and not yet met. */
    pending: () => faults.length,
    /** Queues faults for the next requests, in order. */
    inject(...modes) {
      faults.push(...modes);
    },
    async close() {
      for (const s of sockets) s.destroy();
      await new Promise((res) => server.close(res));
    },
  };
}
