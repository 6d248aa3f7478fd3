package proxy

import (
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"testing"

	"github.com/egress-guard/egress-guard/pkg/tokenreview"
)

// BenchmarkPlainHTTPForwardKeepAlive measures plain-HTTP requests per second through the
// explicit listener from a keep-alive client (Go's http.Client with a proxy, as most HTTP
// libraries behave), each request authenticated, decided and logged on its own.
func BenchmarkPlainHTTPForwardKeepAlive(b *testing.B) {
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "ok")
	}))
	defer up.Close()
	f := start(b, loopPolicy)
	proxyURL := &url.URL{Scheme: "http", Host: f.addr, User: url.UserPassword("k1", "x")}
	client := &http.Client{Transport: &http.Transport{Proxy: http.ProxyURL(proxyURL), MaxIdleConnsPerHost: 4}}
	defer client.CloseIdleConnections()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		resp, err := client.Get(up.URL + "/x")
		if err != nil {
			b.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 {
			b.Fatalf("status %d", resp.StatusCode)
		}
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "req/s")
}

// BenchmarkConnectSetup compares tunnel setup authenticated with an API key and with a cached
// ServiceAccount token: CONNECT, 200, one echoed byte, close.
func BenchmarkConnectSetup(b *testing.B) {
	port, _ := echoServer(b)
	for _, c := range []struct{ name, auth string }{
		{"api_key", basic("fe-key")},
		{"token", "Bearer " + goodToken},
	} {
		b.Run(c.name, func(b *testing.B) {
			cache := &tokenreview.Cache{Reviewer: mapReviewer{}}
			f := startWith(b, tokenPolicy, func(cfg *Config) { cfg.Tokens = cache; cfg.Log = nil })
			req := connectReq("127.0.0.1:"+port, c.auth)
			buf := make([]byte, 1)
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				code, br, conn := rawRequest(b, f.addr, req)
				if code != 200 {
					b.Fatalf("status %d", code)
				}
				conn.Write([]byte("x"))
				br.Read(buf)
				conn.Close()
			}
			b.StopTimer()
			if reviews, _ := cache.Stats(); c.name == "token" && reviews != 1 {
				b.Fatalf("%d TokenReviews for %d connections with one token, want 1", reviews, b.N)
			}
		})
	}
}
