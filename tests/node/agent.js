// A Node peer of electron-common-ipc 16.0.4 driven by ipcbus's tests (issue 19).
//
//   node agent.js broker PATH|PORT   run a broker; print {"ready": ...} once it listens
//   node agent.js client PATH|PORT   run a client; read JSON commands on stdin, one a line,
//                                    and answer each with one JSON line {"id", "ok"|"error"}
//   node agent.js codec              read hex packets (one a line), answer each with the hex
//                                    of socket-serializer's re-encoding of its decoded value
//
// Values cross the JSON lines tagged: {"$bytes": base64}, {"$date": ms}, {"$undefined": 1}.
// Messages received by listeners are printed as {"event": ...} lines.
'use strict';
const readline = require('readline');
const ecipc = require('electron-common-ipc');

const [mode, where] = process.argv.slice(2);
const keepAlive = setInterval(() => {}, 1 << 30); // the library unref()s its sockets
const out = (obj) => process.stdout.write(JSON.stringify(obj) + '\n');
const addr = (s) => (/^\d+$/.test(s) ? Number(s) : s);

function tag(v) {
    if (v === undefined) return { $undefined: 1 };
    if (v === null || typeof v !== 'object') return v;
    if (Buffer.isBuffer(v)) return { $bytes: v.toString('base64') };
    if (v instanceof Date) return { $date: v.getTime() };
    if (v instanceof Error) return { $error: v.message };
    if (Array.isArray(v)) return v.map(tag);
    const o = {};
    for (const k of Object.keys(v)) o[k] = tag(v[k]);
    return o;
}
function untag(v) {
    if (v === null || typeof v !== 'object') return v;
    if (Array.isArray(v)) return v.map(untag);
    if ('$bytes' in v) return Buffer.from(v.$bytes, 'base64');
    if ('$date' in v) return new Date(v.$date);
    if ('$undefined' in v) return undefined;
    if ('$error' in v) return new Error(v.$error);
    const o = {};
    for (const k of Object.keys(v)) o[k] = untag(v[k]);
    return o;
}
const peerOf = (p) => (p ? { id: p.id, type: p.type, name: p.name, process: p.process } : p);

async function runBroker() {
    const broker = ecipc.CreateIpcBusBroker();
    await broker.connect(addr(where));
    out({ ready: where, pid: process.pid });
    process.on('SIGTERM', async () => { await broker.close(); process.exit(0); });
}

async function runCodec() {
    const ss = require('socket-serializer');
    const { JSONParserV1 } = require('json-helpers');
    const rl = readline.createInterface({ input: process.stdin });
    out({ ready: 'codec' });
    for await (const line of rl) {
        try {
            const inp = new ss.IpcPacketBuffer();
            inp.JSON = JSONParserV1;
            inp.decodeFromBuffer(Buffer.from(line, 'hex'));
            const value = inp.parse();
            const outp = new ss.IpcPacketBuffer();
            outp.JSON = JSONParserV1;
            JSONParserV1.install();
            outp.serialize(value);
            JSONParserV1.uninstall();
            out({ ok: outp.buffer.toString('hex') });
        } catch (e) {
            out({ error: String(e) });
        }
    }
    process.exit(0);
}

async function runClient() {
    const clients = {};
    const services = {};
    const proxies = {};
    const answers = {}; // channel -> how to answer requests: {mode, value}
    const rl = readline.createInterface({ input: process.stdin });
    const listen = (name, client, channel) => {
        client.on(channel, (event, ...args) => {
            const line = { event: channel, client: name, sender: peerOf(event.sender), args: tag(args) };
            if (event.request) {
                const how = answers[channel] || { mode: 'echo' };
                line.request = true;
                if (how.mode === 'echo') event.request.resolve(args);
                else if (how.mode === 'resolve') event.request.resolve(untag(how.value));
                else if (how.mode === 'reject') event.request.reject(untag(how.value));
            }
            out(line);
        });
    };
    const handlers = {
        async connect(c) {
            const client = ecipc.CreateIpcBusClient();
            await client.connect(addr(where), { peerName: c.name });
            clients[c.name] = client;
            // "/ping" requests are answered silently: a test's round trip through the broker
            client.on('/ping', (event, ...args) => event.request && event.request.resolve(args));
            return { peer: peerOf(client.peer) };
        },
        async on(c) { listen(c.client, clients[c.client], c.channel); return true; },
        async off(c) { clients[c.client].removeAllListeners(c.channel); return true; },
        async answer(c) { answers[c.channel] = { mode: c.mode, value: c.value }; return true; },
        async send(c) { clients[c.client].send(c.channel, ...untag(c.args)); return true; },
        async flood(c) {
            const payload = Buffer.alloc(c.size, 7);
            for (let i = 0; i < c.count; ++i) clients[c.client].send(c.channel, i, payload);
            return true;
        },
        async sendTo(c) { clients[c.client].sendTo(c.target, c.channel, ...untag(c.args)); return true; },
        async request(c) {
            try {
                const r = c.target
                    ? await clients[c.client].requestTo(c.target, c.channel, c.timeout, ...untag(c.args))
                    : await clients[c.client].request(c.channel, c.timeout, ...untag(c.args));
                return { payload: tag(r.payload), sender: peerOf(r.event.sender) };
            } catch (r) {
                return { err: r && r.err !== undefined ? r.err : String(r) };
            }
        },
        async service(c) {
            const impl = new (require('events').EventEmitter)();
            impl.add = (a, b) => a + b;
            impl.echo = (...args) => args;
            impl.fail = (msg) => { throw new Error(msg); };
            impl.later = (ms, v) => new Promise((res) => setTimeout(() => res(v), ms));
            const svc = ecipc.CreateIpcBusService(clients[c.client], c.name, impl);
            services[c.name] = { svc, impl };
            svc.start();
            return true;
        },
        async serviceStop(c) { services[c.name].svc.stop(); return true; },
        async serviceEvent(c) { services[c.name].svc.sendEvent(c.event, ...untag(c.args)); return true; },
        async serviceEmit(c) { services[c.name].impl.emit(c.event, ...untag(c.args)); return true; },
        async proxy(c) {
            const proxy = ecipc.CreateIpcBusServiceProxy(clients[c.client], c.name);
            proxies[c.name] = proxy;
            for (const ev of c.events || []) {
                proxy.on(ev, (...args) => out({ serviceEvent: ev, service: c.name, args: tag(args) }));
            }
            await proxy.connect({ timeoutDelay: c.timeout || 2000 });
            return true;
        },
        async call(c) {
            try {
                return { result: tag(await proxies[c.name].call(c.call, ...untag(c.args))) };
            } catch (e) {
                return { err: String(e) };
            }
        },
        async status(c) { return tag(await proxies[c.name].getStatus()); },
        async close(c) { await clients[c.client].close(); return true; },
        async exit() { setTimeout(() => process.exit(0), 10); return true; },
    };
    out({ ready: 'client', pid: process.pid });
    for await (const line of rl) {
        let cmd;
        try {
            cmd = JSON.parse(line);
            const result = await handlers[cmd.op](cmd);
            out({ id: cmd.id, ok: result });
        } catch (e) {
            out({ id: cmd && cmd.id, error: String((e && e.stack) || e) });
        }
    }
    process.exit(0);
}

const run = { broker: runBroker, client: runClient, codec: runCodec }[mode];
if (!run) {
    process.stderr.write('usage: node agent.js broker|client ADDRESS | codec\n');
    process.exit(2);
}
run().catch((e) => { process.stderr.write(String((e && e.stack) || e) + '\n'); process.exit(1); });
