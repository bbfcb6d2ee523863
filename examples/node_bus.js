// The Node half of examples/node_bus.py: an electron-common-ipc broker and a Node client.
//
//   npm install electron-common-ipc@16.0.4     (or: npm ci --prefix tests/node)
//   node examples/node_bus.js /tmp/app.bus     then, in another shell:
//   python examples/node_bus.py /tmp/app.bus
//
// The Node client hosts the "clock" service (now, add), greets whoever asks on "/greet", and
// once a Python peer has said hello calls the Python "py-math" service and exits.
'use strict';
const path = require('path');
let ecipc;
try {
    ecipc = require('electron-common-ipc');
} catch (e) {
    ecipc = require(path.join(__dirname, '..', 'tests', 'node', 'node_modules', 'electron-common-ipc'));
}

const where = process.argv[2] || '/tmp/app.bus';
const keepAlive = setInterval(() => {}, 1 << 30); // electron-common-ipc unref()s its sockets

async function main() {
    const broker = ecipc.CreateIpcBusBroker();
    await broker.connect(where);
    const client = ecipc.CreateIpcBusClient();
    await client.connect(where, { peerName: 'node-app' });

    const clock = { now: () => new Date(), add: (a, b) => a + b };
    ecipc.CreateIpcBusService(client, 'clock', clock).start();
    client.on('/greet', (event, name) => event.request.resolve(`hello ${name}, from Node ${process.version}`));
    client.on('/hello', async (event, text, raw) => {
        console.log(`node: ${event.sender.name} says ${JSON.stringify(text)} with ${raw.length} bytes`);
        const math = ecipc.CreateIpcBusServiceProxy(client, 'py-math');
        await math.connect({ timeoutDelay: 5000 });
        console.log(`node: py-math.hypot(3, 4) = ${await math.call('hypot', 3, 4)}`);
        const answer = await client.request('/py-answers', 2000, { question: 6 * 7 });
        console.log(`node: /py-answers -> ${JSON.stringify(answer.payload)}`);
        client.send('/bye', 'done');
        setTimeout(async () => { await broker.close(); process.exit(0); }, 200);
    });
    console.log(`node: broker and client ready on ${where}`);
}
main().catch((e) => { console.error(e); process.exit(1); });
