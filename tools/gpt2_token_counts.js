// GPT-2 BPE token counts, one per input line: each stdin line is a JSON string, each stdout line its count.
// Used by tools/sharegpt_lengths.py; needs the npm package gpt-3-encoder (NODE_PATH or a node_modules above).
'use strict';
const { encode } = require('gpt-3-encoder');
const readline = require('readline');

const rl = readline.createInterface({ input: process.stdin, crlfDelay: Infinity });
rl.on('line', (line) => {
  if (line.length === 0) return;
  process.stdout.write(`${encode(JSON.parse(line)).length}\n`);
});
