// The Go stack for tests/test_differential.py: `backend SYSTEM`, prints "ready PORT".
// net/http's own reading: r.URL.Path (decoded), r.Cookies(), r.Header (canonical keys),
// routes compared with strings.EqualFold, ids read with strconv.ParseInt.
package main

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"regexp"
	"strconv"
	"strings"
)

var system string
var suffix = regexp.MustCompile(`\.[A-Za-z0-9]+$`)
var port = regexp.MustCompile(`:[0-9]*$`)

func handle(w http.ResponseWriter, r *http.Request) {
	var route, id interface{}
	host := strings.TrimSuffix(port.ReplaceAllString(strings.ToLower(r.Host), ""), ".")
	if host == "pay.shop.example" {
		route = "pay-host"
	}
	var segs []string
	for _, s := range strings.Split(r.URL.Path, "/") {
		if s != "" {
			segs = append(segs, s)
		}
	}
	if route == nil && len(segs) >= 2 && strings.EqualFold(segs[0], "api") {
		second := suffix.ReplaceAllString(segs[1], "")
		if strings.EqualFold(second, "payment") {
			route = "payment"
		} else if strings.EqualFold(second, "cart") {
			route = "cart"
		} else if strings.EqualFold(segs[1], "orders") && len(segs) >= 3 {
			if n, err := strconv.ParseInt(suffix.ReplaceAllString(segs[2], ""), 10, 64); err == nil {
				route, id = "orders", n
			}
		}
	}
	cookies := map[string]string{}
	for _, c := range r.Cookies() {
		cookies[c.Name] = c.Value
	}
	headers := map[string]string{}
	for k, v := range r.Header {
		headers[strings.ToLower(k)] = strings.Join(v, ",")
	}
	if emit := r.Header.Get("X-Emit"); emit != "" {
		if raw, err := base64.StdEncoding.DecodeString(emit); err == nil {
			for _, line := range strings.Split(string(raw), "\n") {
				w.Header().Add("Set-Cookie", line)
			}
		}
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(map[string]interface{}{
		"stack": "go", "system": system, "route": route, "id": id,
		"cookies": cookies, "headers": headers,
	})
}

func main() {
	system = os.Args[1]
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	fmt.Printf("ready %d\n", ln.Addr().(*net.TCPAddr).Port)
	http.Serve(ln, http.HandlerFunc(handle))
}
