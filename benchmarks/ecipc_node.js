// Node roles of benchmarks/ecipc.py (issue 19), on electron-common-ipc 16.0.4 from tests/node.
//   node ecipc_node.js respond ADDR CHANNEL           answer requests with their first arg
//   node ecipc_node.js request ADDR CHANNEL N         N sequential requests: {"p50", "p99"} µs
//   node ecipc_node.js sink ADDR CHANNEL COUNT        {"seconds"} from the first to the COUNT-th
//   node ecipc_node.js source ADDR CHANNEL COUNT SIZE send COUNT Buffers of SIZE bytes
// Every role prints {"ready": ...} once connected; a source and a requester first make sure
// the receiver's subscription is in the broker (a request on CHANNEL + "/ping").
'use strict';
const path = require('path');
const ecipc = require(path.join(__dirname, '..', 'tests', 'node', 'node_modules', 'electron-common-ipc'));

const [role, where, channel, a, b] = process.argv.slice(2);
const keepAlive = setInterval(() => {}, 1 << 30);
const out = (o) => process.stdout.write(JSON.stringify(o) + '\n');
const addr = /^\d+$/.test(where) ? Number(where) : where;

async function main() {
    const client = ecipc.CreateIpcBusClient();
    await client.connect(addr, { peerName: `node-${role}` });
    const ping = async () => {
        for (;;) {
            try { await client.request(channel + '/ping', 1000); return; } catch (e) { /* retry */ }
        }
    };
    if (role === 'respond') {
        client.on(channel, (event, x) => event.request.resolve(x));
        client.on(channel + '/ping', (event) => event.request.resolve(true));
        out({ ready: role });
    } else if (role === 'request') {
        out({ ready: role });
        await ping();
        const payload = Buffer.alloc(100, 120);
        const n = Number(a);
        for (let i = 0; i < Math.min(200, n); ++i) await client.request(channel, 5000, payload);
        const times = [];
        for (let i = 0; i < n; ++i) {
            const t0 = process.hrtime.bigint();
            await client.request(channel, 5000, payload);
            times.push(Number(process.hrtime.bigint() - t0) / 1000);
        }
        times.sort((x, y) => x - y);
        out({ p50: times[Math.floor(n / 2)], p99: times[Math.floor(n * 0.99)] });
        process.exit(0);
    } else if (role === 'sink') {
        const count = Number(a);
        let seen = 0;
        let t0 = 0n;
        client.on(channel + '/ping', (event) => event.request.resolve(true));
        client.on(channel, () => {
            if (seen++ === 0) t0 = process.hrtime.bigint();
            if (seen === count) {
                out({ seconds: Number(process.hrtime.bigint() - t0) / 1e9, count });
                process.exit(0);
            }
        });
        out({ ready: role });
    } else if (role === 'source') {
        out({ ready: role });
        await ping();
        const count = Number(a);
        const payload = Buffer.alloc(Number(b), 120);
        for (let i = 0; i < count; ++i) {
            client.send(channel, i, payload);
            if (i % 256 === 255) await new Promise((r) => setImmediate(r)); // let the socket drain
        }
        out({ sent: count });
    }
}
main().catch((e) => { process.stderr.write(String((e && e.stack) || e) + '\n'); process.exit(1); });
