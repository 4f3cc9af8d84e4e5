// refcheck: image references resolved by github.com/distribution/reference, the parser
// containerd, CRI-O and the kubelet resolve image names with. A test oracle only:
// tests/unit/test_images_runtime.py compares webhook/images.py with it.
//
// Input: one JSON string per line. Output, per input line, one JSON object:
// {"normalized": "<ParseNormalizedNamed, then TagNameOnly>"} or {"error": "<message>"}.
package main

import (
	"bufio"
	_ "crypto/sha256" // go-digest accepts only the algorithms linked in, as the runtimes
	_ "crypto/sha512" // do (sha256, and sha384/sha512 from crypto/sha512)
	"encoding/json"
	"fmt"
	"os"

	"github.com/distribution/reference"
)

type result struct {
	Normalized string `json:"normalized,omitempty"`
	Error      string `json:"error,omitempty"`
}

func resolve(ref string) result {
	named, err := reference.ParseNormalizedNamed(ref)
	if err != nil {
		return result{Error: err.Error()}
	}
	// the kubelet pulls `latest` when a reference names neither tag nor digest
	return result{Normalized: reference.TagNameOnly(named).String()}
}

func main() {
	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 0, 64*1024), 16*1024*1024)
	out := bufio.NewWriter(os.Stdout)
	encoder := json.NewEncoder(out)
	encoder.SetEscapeHTML(false)
	line := 0
	for in.Scan() {
		line++
		var ref string
		if err := json.Unmarshal(in.Bytes(), &ref); err != nil {
			fmt.Fprintf(os.Stderr, "refcheck: line %d is not a JSON string: %v\n", line, err)
			os.Exit(2)
		}
		if err := encoder.Encode(resolve(ref)); err != nil {
			fmt.Fprintf(os.Stderr, "refcheck: %v\n", err)
			os.Exit(1)
		}
	}
	if err := in.Err(); err != nil {
		fmt.Fprintf(os.Stderr, "refcheck: reading input: %v\n", err)
		os.Exit(1)
	}
	if err := out.Flush(); err != nil {
		fmt.Fprintf(os.Stderr, "refcheck: %v\n", err)
		os.Exit(1)
	}
}
