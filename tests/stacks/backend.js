// The Node stack for tests/test_differential.py: `node backend.js SYSTEM` (with NODE_PATH
// holding the npm `cookie` package), prints "ready PORT". Node's http, cookies read by
// `cookie.parse` (as Express does), paths decoded with decodeURIComponent and compared
// case-insensitively, ids read with parseInt(s, 10).
'use strict';
const http = require('http');
const cookie = require('cookie');

const system = process.argv[2];
const same = (a, b) => a.toUpperCase() === b.toUpperCase() || a.toLowerCase() === b.toLowerCase();
const bare = (s) => s.replace(/\.[A-Za-z0-9]+$/, '');

const server = http.createServer((req, res) => {
  let route = null;
  let id = null;
  let host = (req.headers.host || '').toLowerCase().replace(/:[0-9]*$/, '');
  if (host.endsWith('.')) host = host.slice(0, -1);
  if (host === 'pay.shop.example') route = 'pay-host';
  let path = req.url.split('?')[0];
  try {
    path = decodeURIComponent(path);
  } catch (e) {
    // left encoded, as Express does with a malformed escape
  }
  const segs = path.split('/').filter((s) => s !== '');
  if (route === null && segs.length >= 2 && same(segs[0], 'api')) {
    const second = bare(segs[1]);
    if (same(second, 'payment')) route = 'payment';
    else if (same(second, 'cart')) route = 'cart';
    else if (same(segs[1], 'orders') && segs.length >= 3) {
      const n = parseInt(segs[2], 10);
      if (!Number.isNaN(n)) {
        route = 'orders';
        id = n;
      }
    }
  }
  const cookies = req.headers.cookie ? cookie.parse(req.headers.cookie) : {};
  if (req.headers['x-emit']) {
    const lines = Buffer.from(req.headers['x-emit'], 'base64').toString('utf8').split('\n');
    try {
      res.setHeader('Set-Cookie', lines);
    } catch (e) {
      // Node refuses a header value with control characters: nothing is sent
    }
  }
  const body = JSON.stringify({ stack: 'node', system, route, id, cookies, headers: req.headers });
  res.setHeader('Content-Type', 'application/json');
  res.end(body);
});
server.listen(0, '127.0.0.1', () => {
  console.log('ready ' + server.address().port);
});
