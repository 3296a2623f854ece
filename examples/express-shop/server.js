// The shop (examples/shop.rs) as an Express app, written the way an Express
// tutorial writes it: nothing in here knows about clusterd. Run it alone
// with `node server.js` (port 3000), or under clusterd, unchanged, with
// `protocol = node` (express-shop.conf).
const express = require('express');

const app = express();
const port = 3000;

app.use(express.json());

const adjectives = ['Classic', 'Organic', 'Deluxe', 'Compact', 'Vintage', 'Smart', 'Rugged', 'Eco'];
const nouns = ['Teapot', 'Backpack', 'Desk Lamp', 'Sneakers', 'Headphones',
  'Notebook', 'Umbrella', 'Mug', 'Rain Jacket', 'Watch'];

// Pretend this is a database call.
function findProduct(id) {
  if (!/^[0-9]+$/.test(id) || Number(id) < 1 || Number(id) > 10000) {
    return null;
  }
  id = Number(id);
  const cents = 199 + ((id * 7919) % 19800);
  return {
    id,
    name: `${adjectives[Math.floor(id / 10) % 8]} ${nouns[id % 10]}`,
    price: Number((cents / 100).toFixed(2)),
  };
}

// And this the payment provider.
function chargeCard(cart) {
  return new Promise((resolve) => setTimeout(() => resolve({ paid: true, cart }), 50));
}

let orders = 0;

app.get('/products/:id', (req, res) => {
  const product = findProduct(req.params.id);
  if (!product) {
    return res.status(404).json({ error: 'no such product' });
  }
  res.json(product);
});

app.post('/checkout', async (req, res) => {
  await chargeCard(req.body && req.body.cart);
  orders += 1;
  res.json({ orderId: `${process.pid}-${orders}`, status: 'confirmed' });
});

app.get('/healthz', (req, res) => {
  res.send('ok');
});

app.listen(port, () => {
  console.log(`Shop listening on port ${port}`);
});
