// A Node service's amqplib round trip against mqic: PLAIN and AMQPLAIN logins, a confirm
// channel, consume with ack. Prints "amqplib smoke ok" and exits 0 on success.
'use strict';
const amqp = require('amqplib');
const { credentials } = require('amqplib');

async function roundTrip(url, opts) {
  const conn = await amqp.connect(url, opts);
  const ch = await conn.createConfirmChannel();
  const { queue } = await ch.assertQueue('', { exclusive: true });
  await new Promise((resolve, reject) =>
    ch.sendToQueue(queue, Buffer.from('hello from node'), { headers: { n: 1 } }, (err) =>
      err ? reject(err) : resolve()));
  const body = await new Promise((resolve) => {
    ch.consume(queue, (msg) => { ch.ack(msg); resolve(msg.content.toString()); });
  });
  if (body !== 'hello from node') throw new Error(`unexpected body ${body}`);
  await ch.close();
  await conn.close();
}

(async () => {
  const url = process.argv[2];
  await roundTrip(url, {});
  const u = new URL(url);
  await roundTrip(url, { credentials: credentials.amqplain(decodeURIComponent(u.username), decodeURIComponent(u.password)) });
  console.log('amqplib smoke ok');
})().catch((e) => { console.error(e); process.exit(1); });
