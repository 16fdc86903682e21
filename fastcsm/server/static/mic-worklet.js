/* fastcsm page: the microphone's samples as 16-bit PCM chunks of about 40 ms, posted to the page,
 * which sends each as a binary message of the conversation WebSocket (`input_audio`). */
class FastcsmMic extends AudioWorkletProcessor {
  constructor() {
    super();
    this.size = Math.round(sampleRate * 0.04);
    this.chunk = new Int16Array(this.size);
    this.filled = 0;
  }
  process(inputs) {
    const input = inputs[0];
    if (input && input.length) {
      const x = input[0];  // mono: the first channel (the stream is asked for one)
      for (let i = 0; i < x.length; i++) {
        const s = Math.max(-1, Math.min(1, x[i]));
        this.chunk[this.filled++] = s < 0 ? s * 32768 : s * 32767;
        if (this.filled === this.size) {
          this.port.postMessage(this.chunk.buffer, [this.chunk.buffer]);
          this.chunk = new Int16Array(this.size);
          this.filled = 0;
        }
      }
    }
    return true;
  }
}
registerProcessor("fastcsm-mic", FastcsmMic);
